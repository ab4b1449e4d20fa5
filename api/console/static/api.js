// The admin API through the console session: the cookie identifies the person, the CSRF
// token (given by /ui/session to this site's scripts only) goes with every change.
let csrfToken = "";
export function setCsrfToken(token) { csrfToken = token; }

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    this.details = body?.error?.details ?? [];
  }
}

export async function call(method, path, body, { text = false } = {}) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  if (body !== undefined) headers["Content-Type"] = text ? "text/plain; charset=utf-8" : "application/json";
  const response = await fetch(path, { method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : (text ? body : JSON.stringify(body)) });
  const data = (response.headers.get("Content-Type") ?? "").includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const v1 = (path) => "/api/v1" + path;
