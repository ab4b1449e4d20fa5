// The console shell: signing in, the page navigation, and what the signed-in key may do.
import { call, setCsrfToken, ApiError } from "./api.js";
import { el, say } from "./dom.js";
import * as machines from "./machines.js";
import * as users from "./users.js";
import * as keys from "./keys.js";
import * as policy from "./policy.js";
import * as audit from "./audit.js";
import * as cluster from "./cluster.js";
import * as health from "./health.js";

const PAGES = [
  ["machines", "Machines", machines, "read"], ["users", "Users and groups", users, "read"],
  ["keys", "Keys", keys, "read"], ["policy", "Policy", policy, "read"],
  ["audit", "Audit log", audit, "audit"], ["cluster", "Cluster", cluster, "read"],
  ["health", "Live health", health, "read"],
];
const GRANTS = { admin: ["read", "write", "audit", "admin"], operator: ["read", "write"], read: ["read"], audit: ["audit"] };

const main = document.getElementById("main");
let session = null;
let leave = null;  // the current page's clean-up (timers)
let visits = 0;

function can(scopes) {
  const granted = new Set(scopes.flatMap((s) => GRANTS[s] ?? []));
  return { read: granted.has("read"), write: granted.has("write"), audit: granted.has("audit"), admin: granted.has("admin") };
}

async function start() {
  session = await call("GET", "/ui/session");
  if (!session.signed_in) return showSignIn(session);
  setCsrfToken(session.csrf_token);
  const k = session.key;
  document.getElementById("who").replaceChildren(
    el("span", {}, `${k.user ?? k.name} (${k.scopes.join(", ")}) via ${session.replica} `),
    el("button", { type: "button", on: { click: signOut } }, "Sign out"));
  window.addEventListener("hashchange", route);
  route();
}

function allowedPages() {
  const c = can(session.key.scopes);
  return PAGES.filter(([, , , needs]) => c[needs]);
}

async function route() {
  const pages = allowedPages();
  const name = location.hash.slice(1);
  const page = pages.find(([id]) => id === name) ?? pages[0];
  document.getElementById("nav").replaceChildren(...pages.map(([id, label]) =>
    el("a", { href: `#${id}`, "aria-current": id === page[0] ? "page" : false }, label)));
  leave?.();
  leave = null;
  document.title = `${page[1]} · raftmesh console`;
  say("");
  // Each visit renders into its own section: a page still loading when the person moved on
  // fills a section no longer shown, and its timers are stopped as soon as it is done.
  const section = el("section", { "aria-labelledby": "page-title" }, el("h1", { id: "page-title" }, page[1]));
  main.replaceChildren(section);
  const visit = ++visits;
  try {
    const stop = await page[2].render(section, { can: can(session.key.scopes), reload: route });
    if (visit === visits) leave = stop ?? null;
    else stop?.();
  } catch (e) {
    if (visit === visits) showError(e);
  }
}

export function showError(e) {
  if (e instanceof ApiError && e.status === 401) return location.reload();  // session ended
  say(e.message, "error");
}

function showSignIn(info) {
  document.getElementById("nav").replaceChildren();
  const key = el("input", { id: "api-key", name: "api_key", type: "password", required: true, autocomplete: "off" });
  const form = el("form", { class: "signin", on: { submit: async (event) => {
    event.preventDefault();
    try {
      await call("POST", "/ui/session", { api_key: key.value });
      location.hash = "";
      location.reload();
    } catch (e) { say(e.message, "error"); }
  } } },
  el("h1", {}, "Sign in"),
  el("label", { for: "api-key" }, "API key"), key,
  el("p", {}, el("button", { type: "submit", class: "primary" }, "Sign in with API key")));
  main.replaceChildren(form);
  if (info.sso) main.append(el("p", {}, el("a", { href: "/ui/sso", id: "sso" }, "Sign in with single sign-on")));
  key.focus();
}

async function signOut() {
  try { await call("DELETE", "/ui/session"); } finally { location.reload(); }
}

start().catch(showError);
