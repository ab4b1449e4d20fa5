// The policy editor: validate (errors at their lines, the policy's tests), compare with the
// current policy, and save only over the version that was loaded.
import { call, v1 } from "./api.js";
import { el, say } from "./dom.js";
import { showError } from "./app.js";
import { parse, lineOf, diff } from "./hujson.js";

export async function render(main, { can }) {
  let current = { version: 0, text: "" };
  try { current = (await call("GET", v1("/policy"))).policy; } catch (e) { if (e.status !== 404) throw e; }
  const editor = el("textarea", { id: "policy-text", class: "policy", spellcheck: "false",
    "aria-describedby": "policy-result", readonly: !can.write });
  editor.value = current.text;
  const result = el("div", { id: "policy-result", "aria-live": "polite" });
  const changes = el("div", {});
  const info = el("p", { class: "muted" }, `Editing over version ${current.version || "(none)"}.`);

  const goTo = (line) => {
    const starts = editor.value.split("\n").slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    editor.focus();
    editor.setSelectionRange(starts, starts + (editor.value.split("\n")[line - 1] ?? "").length);
  };
  const showProblems = (e) => {
    const { lines } = parse(editor.value);
    const items = (e.details.length ? e.details : [{ path: "$", message: e.message }]).map((d) => {
      const line = Number(/line (\d+)/.exec(d.message ?? "")?.[1]) || lineOf(lines, d.path ?? "");
      return el("li", {}, line ? el("button", { type: "button", class: "goto", on: { click: () => goTo(line) } }, `Line ${line}`) : null,
        ` ${d.path ?? ""}: ${d.message ?? ""}`);
    });
    result.replaceChildren(el("p", { class: "error" }, "The policy is not valid:"), el("ul", { class: "problems" }, items));
  };
  const validate = async () => {
    try {
      const r = await call("POST", v1("/policy/validate"), editor.value, { text: true });
      const tests = parse(editor.value).value?.tests ?? [];
      result.replaceChildren(el("p", { class: "ok" }, `Valid. ${tests.length} policy test${tests.length === 1 ? " passes" : "s pass"}.`),
        el("ul", {}, r.warnings.map((w) => el("li", { class: "warn" }, `${w.path}: ${w.message}`))));
      return true;
    } catch (e) {
      if (e.status === 400 || e.status === 413) { showProblems(e); return false; }
      throw e;
    }
  };
  const showDiff = () => {
    const d = diff(current.text, editor.value);
    changes.replaceChildren(el("h2", {}, "Changes against the current policy"), d === null
      ? el("p", {}, "Too large to compare here.")
      : el("pre", { class: "diff", tabindex: "0" }, d.filter(([k]) => k !== "=").length === 0 ? "no changes"
        : d.map(([k, line]) => el("span", { class: k === "+" ? "add" : k === "-" ? "del" : "" }, `${k === "=" ? " " : k} ${line}`))));
  };
  const save = async () => {
    if (!(await validate())) return;
    try {
      const r = await call("PUT", v1(`/policy?expected_version=${current.version}`), editor.value, { text: true });
      current = { version: r.policy.version, text: editor.value };
      info.textContent = `Editing over version ${current.version}.`;
      say(`policy saved as version ${r.policy.version}`);
      showDiff();
    } catch (e) {
      if (e.code === "version_conflict") {
        result.replaceChildren(el("p", { class: "error", role: "alert" },
          `Not saved: someone else saved a newer policy since version ${current.version} was loaded. Your text is kept; reload the page to see theirs.`));
      } else if (e.status === 400) showProblems(e);
      else showError(e);
    }
  };
  const button = (label, fn, cls) => el("button", { type: "button", class: cls, on: { click: () => fn().catch(showError) } }, label);
  main.append(info, el("label", { for: "policy-text" }, "Policy (HuJSON)"), editor,
    el("p", {}, button("Validate", validate), button("Show changes", async () => showDiff()),
      can.write ? button("Save", save, "primary") : null), result, changes);
}
