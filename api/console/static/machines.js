// Machines: every node with its state, and what an operator does to them.
import { call, v1 } from "./api.js";
import { el, table, when, say, ask, confirmed } from "./dom.js";
import { showError } from "./app.js";

export async function render(main, { can, reload }) {
  const [listed, routeTable] = await Promise.all([call("GET", v1("/nodes")), call("GET", v1("/routes"))]);
  const nodes = listed.nodes.sort((a, b) => a.name.localeCompare(b.name));
  const sets = new Map(routeTable.routes.filter((r) => !r.exit_node).map((r) => [r.cidr, r]));
  const names = new Map(nodes.map((n) => [n.id, n.name]));
  const act = (label, fn, cls) => el("button", { type: "button", class: cls, on: { click: async () => {
    try { if (await fn() !== false) { say(`${label}: done`); reload(); } } catch (e) { showError(e); }
  } } }, label);
  const rows = nodes.map((n) => {
    const paths = n.stream?.paths;
    const actions = !can.write ? [] : [
      !n.approved && act(`Approve ${n.name}`, () => call("POST", v1(`/nodes/${enc(n.id)}/approve`)), "primary"),
      act(`Rename ${n.name}`, async () => {
        const v = await ask(`Rename ${n.name}`, [{ name: "name", label: "New name", value: n.name, required: true }]);
        return v && call("PATCH", v1(`/nodes/${enc(n.id)}`), { name: v.name });
      }),
      can.admin && act(`Tag ${n.name}`, async () => {
        const v = await ask(`Tags of ${n.name}`, [{ name: "tags", label: "Tags (tag:x, comma separated)", value: n.tags.join(", ") }]);
        return v && call("PATCH", v1(`/nodes/${enc(n.id)}`), { tags: split(v.tags) });
      }),
      n.advertised_routes.length > 0 && act(`Routes of ${n.name}`, async () => {
        const v = await ask(`Approved routes of ${n.name} (advertised: ${n.advertised_routes.join(", ")})`,
          [{ name: "routes", label: "Approved routes (comma separated)", value: n.approved_routes.join(", ") }]);
        return v && call("PUT", v1(`/nodes/${enc(n.id)}/routes`), { approved_routes: split(v.routes) });
      }),
      act(`Expire ${n.name}`, async () => (await confirmed(`Expire the key of ${n.name} now?`)) &&
        call("POST", v1(`/nodes/${enc(n.id)}/expire`)), "danger"),
      act(`Delete ${n.name}`, async () => (await confirmed(`Delete ${n.name}? Its streams close at once.`)) &&
        call("DELETE", v1(`/nodes/${enc(n.id)}`)), "danger"),
    ].filter(Boolean);
    return [
      n.name, n.approved ? (n.expired ? "expired" : (n.online ? el("span", { class: "up" }, "online") : "offline"))
        : el("span", { class: "warn" }, "pending approval"),
      n.user ?? "—", n.tags.join(", ") || "—", [n.ipv4, n.ipv6].filter(Boolean).join(" "),
      routes(n, sets, names), paths ? `${paths.direct ?? 0} direct, ${paths.relay ?? 0} relayed` : "—",
      n.stream?.replica ?? n.stream_replica ?? "—", n.stream?.acked_version ?? "—", when(n.last_seen),
      n.expired ? "expired" : when(n.key_expiry), actions,
    ];
  });
  main.append(table(["Name", "State", "Owner", "Tags", "Addresses", "Routes", "Paths to peers", "Serving replica",
    "Acked netmap", "Last seen", "Key expiry", can.write ? "Actions" : null].filter(Boolean),
  can.write ? rows : rows.map((r) => r.slice(0, -1)), `${nodes.length} machine${nodes.length === 1 ? "" : "s"}`));
}

// A subnet approved on several nodes is a high-availability set (GET /api/v1/routes): its
// traffic goes through the primary, the others stand by. Exit routes are not elected.
function routes(n, sets, names) {
  if (!n.advertised_routes.length) return "—";
  return n.advertised_routes.map((r) => {
    if (!n.approved_routes.includes(r)) return `${r} (not approved)`;
    const set = sets.get(r);
    if (!set) return `${r} (approved)`;
    const name = (id) => names.get(id) ?? id;
    const standby = set.candidates.map((c) => c.id).filter((id) => id !== n.id && id !== set.primary).map(name);
    const also = standby.length ? `; standby: ${standby.join(", ")}` : "";
    if (set.primary === n.id) return `${r} (approved, primary${also})`;
    return `${r} (approved, ${set.primary ? `standby; primary: ${name(set.primary)}` : "no primary"}${also})`;
  }).join(", ");
}

export const split = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
export const enc = encodeURIComponent;
