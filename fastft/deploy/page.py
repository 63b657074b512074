"""The page `fastft serve` shows: one HTML document, the class names escaped (data, never markup)."""
from __future__ import annotations

import html
import secrets


def page_html(classes: list[str], gradcam: bool, paths: bool) -> str:
    """The page, with every class name escaped: a folder name is text, not markup. Its policy runs only the
    page's own script (a fresh nonce each time), so even markup that slipped through would not run."""
    path_form = ('<p>or a file under the server\'s allowed folder: <input id="path" size="40" '
                 'placeholder="photo.jpg or /allowed/folder/photo.jpg"> <button id="go">Predict</button></p>'
                 if paths else "")
    return (PAGE.replace("{{classes}}", html.escape(", ".join(classes)))
            .replace("{{gradcam}}", "on" if gradcam else "off").replace("{{path_form}}", path_form)
            .replace("{{nonce}}", secrets.token_urlsafe(16)))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastft</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'nonce-{{nonce}}'">
<style>
 body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; color: #222; }
 #drop { border: 2px dashed #999; border-radius: 8px; padding: 2rem; text-align: center; }
 #drop.over { background: #eef; }
 .row { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
 .row .name { width: 12rem; } .bar { background: #4a7bd0; height: 1rem; } .error { color: #b00; }
 img { max-width: 100%; }
</style></head>
<body>
<h1>fastft</h1>
<p id="classes">Classes: {{classes}}. Grad-CAM: {{gradcam}}.</p>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
{{path_form}}
<h2 id="label"></h2><div id="bars"></div><p id="error" class="error"></p><img id="cam" alt="">
<script nonce="{{nonce}}">
const drop = document.getElementById('drop');
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // names are text, never markup
  return node;
}
async function send(form) {
  form.append('gradcam', '{{gradcam}}' === 'on');
  document.getElementById('error').textContent = '';
  const response = await fetch('/predict', {method: 'POST', body: form, headers: {'X-Fastft': '1'}});
  const body = await response.json();
  if (!response.ok) { document.getElementById('error').textContent = body.error; return; }
  const result = body[0];
  document.getElementById('label').textContent = result.label;
  const bars = document.getElementById('bars');
  bars.replaceChildren(...Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5)
    .map(([name, p]) => {
      const row = element('div', 'row');
      const bar = element('span', 'bar');
      bar.style.width = (p * 20).toFixed(1) + 'rem';
      row.append(element('span', 'name', name), bar, element('span', '', p.toFixed(3)));
      return row;
    }));
  const cam = document.getElementById('cam');
  cam.src = result.gradcam_png ? 'data:image/png;base64,' + result.gradcam_png : '';
}
function upload(file) { const form = new FormData(); form.append('image', file); send(form); }
document.getElementById('file').addEventListener('change', e => upload(e.target.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); upload(e.dataTransfer.files[0]); });
const go = document.getElementById('go');
if (go) go.addEventListener('click', () => {
  const form = new FormData(); form.append('path', document.getElementById('path').value); send(form); });
</script>
</body></html>
"""
