// xterm.js writes some of its styles as text: two <style> elements whose
// textContent it sets, and style="" attributes. This page's
// Content-Security-Policy (style-src 'self', no 'unsafe-inline') refuses
// both, and the terminal loses its colours. Styles set through the CSSOM
// are not inline markup and the policy allows them, so, for this page:
// a <style> made by script becomes an inert <template> whose text goes
// into a constructed stylesheet the document adopts, and setAttribute
// ("style", text) becomes style.cssText = text. Only scripts of this
// origin run here (script-src 'self'); none of the text is the server's.
// Loaded before xterm.js, by the session page only.
(() => {
  const create = Document.prototype.createElement;
  Document.prototype.createElement = function (tag, opts) {
    if (String(tag).toLowerCase() !== "style") return create.call(this, tag, opts);
    const holder = create.call(this, "template");
    const sheet = new CSSStyleSheet();
    let text = "";
    this.adoptedStyleSheets = [...this.adoptedStyleSheets, sheet];
    Object.defineProperty(holder, "textContent", {
      get: () => text,
      set: (v) => {
        text = String(v);
        sheet.replaceSync(text);
      },
    });
    return holder;
  };
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function (name, value) {
    if (String(name).toLowerCase() === "style") {
      this.style.cssText = String(value);
      return;
    }
    return setAttribute.call(this, name, value);
  };
})();
