// Shared by every panel view (views.py puts this in front of each view's module).
function panelFrame(el, titleText) {
  el.style.fontFamily = "var(--jp-ui-font-family, sans-serif)";
  el.style.fontSize = "12px";
  const title = document.createElement("div");
  title.style.fontWeight = "600";
  title.textContent = titleText;
  return title;
}

function makeCanvas(width, height, className) {
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  canvas.className = className;
  canvas.style.display = "block";
  return canvas;
}
