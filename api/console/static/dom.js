// Building the page: data only ever becomes text nodes or attribute values, never markup.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) if (child != null) node.append(child);  // strings: text nodes
  return node;
}

export function table(columns, rows, caption) {
  return el("table", {}, caption ? el("caption", { class: "muted" }, caption) : null,
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
    el("tbody", {}, rows.length ? rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))
      : el("tr", {}, el("td", { colspan: columns.length }, "none"))));
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "—";
}

let status;
export function say(message, kind = "ok") {
  status ??= document.getElementById("status");
  status.replaceChildren(el("span", { class: kind }, message));
}

// A modal dialog with a form: resolves to the field values, or null when cancelled.
export function ask(title, fields, submitLabel = "OK") {
  const dialog = document.getElementById("dialog");
  const inputs = fields.map((f) => el("input", { name: f.name, value: f.value ?? "", type: f.type ?? "text",
    required: f.required ?? false, autocomplete: "off" }));
  const form = el("form", { method: "dialog" },
    el("h2", { id: "dialog-title" }, title),
    fields.map((f, i) => el("label", {}, f.label, inputs[i])),
    el("p", {}, el("button", { type: "submit", class: "primary", value: "ok" }, submitLabel),
      el("button", { type: "button", on: { click: () => dialog.close("cancel") } }, "Cancel")));
  dialog.replaceChildren(form);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"
      ? Object.fromEntries(inputs.map((i) => [i.name, i.value])) : null), { once: true });
    dialog.showModal();
    (inputs[0] ?? form.querySelector("button")).focus();
  });
}

export async function confirmed(question) {
  return (await ask(question, [], "Yes, do it")) !== null;
}

// Run `fn` every `ms` after the previous run ended; returns what stops it.
export function every(ms, fn) {
  let stopped = false, timer = null;
  const tick = () => Promise.resolve().then(fn).catch((e) => say(e.message, "error"))
    .finally(() => { if (!stopped) timer = setTimeout(tick, ms); });
  timer = setTimeout(tick, ms);
  return () => { stopped = true; clearTimeout(timer); };
}
