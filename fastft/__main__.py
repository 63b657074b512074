from fastft.cli import main

main()
