"""The run folder's files are listed once, in fastft/run_folder.py's FILES, and the README's table names exactly them."""
import re
from pathlib import Path

from fastft.run_folder import FILES, RunFolder

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_run_folder_table() -> set[str]:
    """The file names in the first column of the README's run-folder table (the one under '## Outputs')."""
    section = README.read_text().split("\n## Outputs\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name.rstrip("/") for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_the_readme_lists_exactly_the_files_a_run_folder_holds():
    assert readme_run_folder_table() == {f.name for f in FILES.values()}


def test_every_file_says_what_it_holds_and_the_folder_names_it():
    folder = RunFolder(Path("runs/x"))
    for attribute, file in FILES.items():
        assert file.what and getattr(folder, attribute) == Path("runs/x") / file.name
