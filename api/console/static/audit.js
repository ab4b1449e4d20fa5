// The audit log: filtered (by actor, action, target, and a time range in UTC like the times
// shown), paged by sequence number, and its hash chain checked.
import { call, v1 } from "./api.js";
import { el, table, when } from "./dom.js";
import { showError } from "./app.js";

const PAGE = 50;

export async function render(main) {
  const filters = Object.fromEntries(["actor", "action", "target"].map((f) =>
    [f, el("input", { id: `audit-${f}`, name: f, autocomplete: "off" })]));
  // datetime-local has no time zone: the values are read as UTC, like the Time column
  const range = { since: ["audit-since", "From (UTC)"], until: ["audit-until", "To (UTC)"] };
  const times = Object.fromEntries(Object.entries(range).map(([f, [id]]) =>
    [f, el("input", { id, name: f, type: "datetime-local", step: "1" })]));
  const chain = el("p", { id: "audit-chain", "aria-live": "polite" }, "Checking the hash chain…");
  const results = el("div", {});
  const pages = [0];  // after_seq of each page seen: "previous" goes back through them
  const load = async (afterSeq) => {
    const q = new URLSearchParams({ limit: String(PAGE), after_seq: String(afterSeq) });
    for (const [f, input] of Object.entries(filters)) if (input.value.trim()) q.set(f, input.value.trim());
    for (const [f, input] of Object.entries(times)) if (input.value) q.set(f, String(Date.parse(input.value + "Z") / 1000));
    const page = await call("GET", v1(`/audit?${q}`));
    const more = page.entries.length === PAGE && page.next_after_seq < page.head.seq;
    results.replaceChildren(
      table(["Seq", "Time", "Actor", "Action", "Target"], page.entries.map((e) =>
        [String(e.seq), when(e.time), e.actor, e.action, e.target]),
      `entries after ${afterSeq} (log head: ${page.head.seq})`),
      el("p", {},
        pages.length > 1 ? el("button", { type: "button", on: { click: () => { pages.pop(); load(pages.at(-1)).catch(showError); } } }, "Previous page") : null,
        more ? el("button", { type: "button", on: { click: () => { pages.push(page.next_after_seq); load(page.next_after_seq).catch(showError); } } }, "Next page") : null));
  };
  main.append(chain, el("form", { class: "inline", on: { submit: (event) => {
    event.preventDefault();
    pages.splice(1);
    load(0).catch(showError);
  } } }, Object.entries(filters).map(([f, input]) => el("label", { for: input.id }, `${f[0].toUpperCase()}${f.slice(1)}`, input)),
  Object.entries(times).map(([f, input]) => el("label", { for: input.id }, range[f][1], input)),
  el("button", { type: "submit", class: "primary" }, "Filter")), results);
  await load(0);
  const v = await call("GET", v1("/audit/verify"));
  chain.replaceChildren(el("span", { class: v.intact ? "ok" : "error" },
    v.intact ? `Hash chain intact: ${v.detail}.` : `Hash chain BROKEN: ${v.detail}`));
}
