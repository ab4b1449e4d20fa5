// The cluster: every member's Raft state, lag and readiness, refreshed while shown.
import { call, v1 } from "./api.js";
import { el, table, say, ask, confirmed, every } from "./dom.js";
import { showError } from "./app.js";
import { enc } from "./machines.js";

const REFRESH_MS = 2000;

export async function render(main, { can }) {
  const summary = el("p", { id: "cluster-summary", "aria-live": "polite" });
  const members = el("div", {});
  main.append(summary, members);
  if (can.admin) {
    main.append(el("p", {}, el("button", { type: "button", on: { click: () => addMember().catch(showError) } }, "Add a member")));
  }
  const refresh = async () => {
    const c = await call("GET", v1("/cluster"));
    const leaderCommit = c.commit_index ?? 0;
    summary.replaceChildren(`Leader ${c.leader ?? "unknown"}, term ${c.term ?? "?"}, commit index ${leaderCommit}, `,
      el("span", { class: c.has_quorum ? "up" : "down" }, c.has_quorum ? "quorum" : "NO QUORUM"));
    members.replaceChildren(table(["Member", "Raft address", "Reachable", "State", "Term", "Commit", "Applied", "Lag", "Ready",
      can.admin ? "Actions" : null].filter(Boolean), [...c.members].sort(byId).map((m) => [
      m.id ?? "(unregistered)", m.raft_addr,
      el("span", { class: m.reachable ? "up" : "down" }, m.reachable ? "up" : "down"),
      m.state ?? "—", m.term ?? "—", m.commit_index ?? "—", m.applied_index ?? "—",
      m.applied_index != null ? String(Math.max(0, leaderCommit - m.applied_index)) : "—",
      m.ready == null ? "—" : el("span", { class: m.ready ? "up" : "down" }, m.ready ? "ready" : `not ready: ${m.ready_reason}`),
      can.admin && m.id ? el("button", { type: "button", class: "danger", on: { click: () => removeMember(m.id).catch(showError) } }, `Remove ${m.id}`) : (can.admin ? "" : null),
    ].filter((x) => x !== null)), `${c.members.length} members`));
  };
  await refresh();
  return every(REFRESH_MS, refresh);
}

const byId = (a, b) => String(a.id ?? a.raft_addr).localeCompare(String(b.id ?? b.raft_addr));

async function addMember() {
  const v = await ask("Add a replica (start it with --join first)", [
    { name: "id", label: "Id", required: true }, { name: "raft_addr", label: "Raft address (host:port)", required: true },
    { name: "api_url", label: "API URL", required: true }], "Add member");
  if (!v || !(await confirmed(`Add ${v.id} at ${v.raft_addr} to the Raft membership?`))) return;
  await call("POST", v1("/cluster/members"), v);
  say(`${v.id} added`);
}

async function removeMember(id) {
  if (!(await confirmed(`Remove ${id} from the cluster? It stops being a Raft member.`))) return;
  await call("DELETE", v1(`/cluster/members/${enc(id)}`));
  say(`${id} removed`);
}
