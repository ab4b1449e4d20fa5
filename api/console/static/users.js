// Users and groups: users from the API; groups as the policy names them and as each
// user's identity provider reported them (on their nodes).
import { call, v1 } from "./api.js";
import { el, table, when, say, confirmed } from "./dom.js";
import { showError } from "./app.js";
import { parse } from "./hujson.js";
import { enc } from "./machines.js";

export async function render(main, { can, reload }) {
  const [{ users }, { nodes }] = await Promise.all([call("GET", v1("/users")), call("GET", v1("/nodes"))]);
  const policyGroups = await call("GET", v1("/policy")).then((p) => parse(p.policy.text).value?.groups ?? {},
    (e) => (e.status === 404 ? {} : Promise.reject(e)));
  const idpGroups = {};
  for (const n of nodes) if (n.user) idpGroups[n.user] = n.idp_groups ?? [];
  if (can.write) {
    const name = el("input", { id: "new-user", name: "name", required: true, autocomplete: "off" });
    const display = el("input", { id: "new-user-display", name: "display_name", autocomplete: "off" });
    main.append(el("form", { class: "inline", on: { submit: async (event) => {
      event.preventDefault();
      try {
        await call("POST", v1("/users"), display.value ? { name: name.value, display_name: display.value } : { name: name.value });
        say(`user ${name.value} created`);
        reload();
      } catch (e) { showError(e); }
    } } }, el("label", { for: "new-user" }, "New user", name), el("label", { for: "new-user-display" }, "Display name", display),
    el("button", { type: "submit", class: "primary" }, "Create user")));
  }
  main.append(el("h2", {}, "Users"), table(["Name", "Display name", "Created", "Policy groups", "Identity provider groups",
    can.write ? "Actions" : null].filter(Boolean), users.map((u) => [
    u.name, u.display_name ?? "", when(u.created_at),
    Object.entries(policyGroups).filter(([, members]) => Array.isArray(members) && members.includes(u.name)).map(([g]) => g).join(", ") || "—",
    (idpGroups[u.name] ?? []).join(", ") || "—",
    can.write ? el("button", { type: "button", class: "danger", on: { click: async () => {
      if (!(await confirmed(`Delete user ${u.name}?`))) return;
      try { await call("DELETE", v1(`/users/${enc(u.name)}`)); say(`user ${u.name} deleted`); reload(); } catch (e) { showError(e); }
    } } }, `Delete ${u.name}`) : null,
  ].filter((c) => c !== null))));
  main.append(el("h2", {}, "Groups in the policy"), table(["Group", "Members"],
    Object.entries(policyGroups).map(([g, members]) => [g, Array.isArray(members) ? members.join(", ") : ""])));
}
