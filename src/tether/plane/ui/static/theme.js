// Follows Airflow's colour mode (light or dark) and its colours, before the page paints.
// Airflow's UI keeps the mode as a class on its <html> and in localStorage ("theme");
// in Airflow's frame the page reads the mode and the UI's own colour tokens from its parent.
(function () {
  "use strict";
  var root = document.documentElement;
  // Airflow's (Chakra UI) colour tokens the stylesheet uses, with its own values as fallback.
  var TOKENS = [
    "bg", "bg-subtle", "bg-muted", "bg-panel", "bg-emphasized",
    "fg", "fg-muted", "fg-subtle", "fg-error", "fg-warning", "fg-success", "fg-info",
    "border", "border-muted", "border-emphasized",
    "bg-error", "bg-warning", "bg-success", "bg-info",
    "brand-solid", "brand-contrast", "brand-fg", "brand-subtle", "brand-muted",
    "blue-solid", "blue-contrast", "blue-fg", "blue-subtle",
    "red-solid", "red-contrast", "red-fg", "red-subtle",
    "green-fg", "green-subtle", "orange-fg", "orange-subtle", "gray-subtle", "gray-fg"
  ];

  function host() {
    try {
      if (window.parent !== window && window.parent.document) return window.parent.document.documentElement;
    } catch (e) { /* another origin: no parent to follow */ }
    return null;
  }

  function mode(parent) {
    if (parent) {
      if (parent.classList.contains("dark")) return "dark";
      if (parent.classList.contains("light")) return "light";
    }
    var chosen = null;
    try { chosen = window.localStorage.getItem("theme"); } catch (e) { /* storage refused */ }
    if (chosen === "dark" || chosen === "light") return chosen;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  function borrow(parent) {
    if (!parent) return;
    var style = window.parent.getComputedStyle(parent);
    TOKENS.forEach(function (name) {
      var value = style.getPropertyValue("--chakra-colors-" + name).trim();
      if (value) root.style.setProperty("--af-" + name, value);
      else root.style.removeProperty("--af-" + name);
    });
    var font = style.getPropertyValue("--chakra-fonts-body").trim();
    if (font) root.style.setProperty("--af-font", font);
  }

  function apply() {
    var parent = host();
    var current = mode(parent);
    root.setAttribute("data-theme", current);
    root.style.colorScheme = current;
    borrow(parent);
  }

  apply();
  var parent = host();
  if (parent && window.MutationObserver) {
    new MutationObserver(apply).observe(parent, { attributes: true, attributeFilter: ["class", "style"] });
  }
  window.addEventListener("storage", function (event) { if (event.key === "theme") apply(); });
  if (window.matchMedia) {
    var query = window.matchMedia("(prefers-color-scheme: dark)");
    if (query.addEventListener) query.addEventListener("change", apply);
  }
})();
