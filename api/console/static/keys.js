// Pre-auth keys (create: shown once; revoke) and, for admins, API keys.
import { call, v1 } from "./api.js";
import { el, table, when, say, confirmed } from "./dom.js";
import { showError } from "./app.js";
import { enc, split } from "./machines.js";

function shownOnce(where, what, secret) {
  where.replaceChildren(el("p", {}, `${what} — copy it now, it is not shown again:`),
    el("p", { class: "secret", id: "shown-once", tabindex: "0" }, secret));
  where.querySelector("#shown-once").focus();
}

function field(id, label, attrs = {}) {
  const input = el("input", { id, name: id, autocomplete: "off", ...attrs });
  const wrap = attrs.type === "checkbox" ? el("label", { class: "check", for: id }, input, label) : el("label", { for: id }, label, input);
  return [wrap, input];
}

const revoke = (label, path, reload) => el("button", { type: "button", class: "danger", on: { click: async () => {
  if (!(await confirmed(`${label}?`))) return;
  try { await call("DELETE", path); say(`${label}: done`); reload(); } catch (e) { showError(e); }
} } }, label);

export async function render(main, { can, reload }) {
  const preauthList = el("div", {});
  const showPreauth = async () => {
    const { preauth_keys: preauth } = await call("GET", v1("/preauth-keys"));
    preauthList.replaceChildren(table(["Id", "User", "Reusable", "Ephemeral", "Tags", "Used", "Expires", can.write ? "Actions" : null].filter(Boolean),
      preauth.map((k) => [k.id, k.user, k.reusable ? "yes" : "no", k.ephemeral ? "yes" : "no", (k.tags ?? []).join(", ") || "—",
        String(k.used ?? 0), when(k.expires_at), can.write ? revoke(`Revoke pre-auth key ${k.id}`, v1(`/preauth-keys/${enc(k.id)}`), reload) : null,
      ].filter((c) => c !== null))));
  };
  main.append(el("h2", {}, "Pre-auth keys"));
  const secret = el("div", { "aria-live": "polite" });
  if (can.write) {
    const [userL, user] = field("pk-user", "User", { required: true });
    const [reuseL, reusable] = field("pk-reusable", "Reusable", { type: "checkbox" });
    const [ephL, ephemeral] = field("pk-ephemeral", "Ephemeral", { type: "checkbox" });
    const [hoursL, hours] = field("pk-hours", "Valid for (hours)", { type: "number", min: "1", value: "1" });
    const [tagsL, tags] = field("pk-tags", "Tags (admin)");
    main.append(el("form", { class: "inline", on: { submit: async (event) => {
      event.preventDefault();
      const body = { user: user.value, reusable: reusable.checked, ephemeral: ephemeral.checked,
        expiration_seconds: Math.round(Number(hours.value) * 3600) };
      if (split(tags.value).length) body.tags = split(tags.value);
      try {
        const r = await call("POST", v1("/preauth-keys"), body);
        shownOnce(secret, `Pre-auth key ${r.preauth_key.id} for ${r.preauth_key.user}`, r.key);
        await showPreauth();
      } catch (e) { showError(e); }
    } } }, userL, reuseL, ephL, hoursL, tagsL, el("button", { type: "submit", class: "primary" }, "Create pre-auth key")));
  }
  main.append(secret, preauthList);
  await showPreauth();
  if (!can.admin) return;
  const apiKeyList = el("div", {});
  const showApiKeys = async () => {
    const { api_keys: apiKeys } = await call("GET", v1("/api-keys"));
    apiKeyList.replaceChildren(table(["Id", "Name", "Scopes", "User", "Expires", "Actions"], apiKeys.map((k) => [k.id, k.name,
      k.scopes.join(", "), k.user ?? "—", when(k.expires_at), revoke(`Delete API key ${k.id}`, v1(`/api-keys/${enc(k.id)}`), reload)])));
  };
  main.append(el("h2", {}, "API keys"));
  const [nameL, name] = field("ak-name", "Name", { required: true });
  const scopeBoxes = ["admin", "operator", "read", "audit", "scim"].map((s) => field(`ak-scope-${s}`, s, { type: "checkbox", value: s }));
  const [daysL, days] = field("ak-days", "Valid for (days, empty: no expiry)", { type: "number", min: "1" });
  const apiSecret = el("div", { "aria-live": "polite" });
  main.append(el("form", { class: "inline", on: { submit: async (event) => {
    event.preventDefault();
    const body = { name: name.value, scopes: scopeBoxes.filter(([, b]) => b.checked).map(([, b]) => b.value) };
    if (days.value) body.expiration_seconds = Math.round(Number(days.value) * 86400);
    try {
      const r = await call("POST", v1("/api-keys"), body);
      shownOnce(apiSecret, `API key ${r.api_key.id} (${r.api_key.scopes.join(", ")})`, r.key);
      await showApiKeys();
    } catch (e) { showError(e); }
  } } }, nameL, el("fieldset", {}, el("legend", {}, "Scopes"), scopeBoxes.map(([l]) => l)), daysL,
  el("button", { type: "submit", class: "primary" }, "Create API key")), apiSecret, apiKeyList);
  await showApiKeys();
}
