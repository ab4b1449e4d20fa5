// HuJSON (JSON with comments and trailing commas) read in the browser for one purpose:
// where each value is written, so an error the server reports at a policy path
// ("acls[2].dst[0]") is shown at its line. The server decides validity, not this.
export function parse(text) {
  let i = 0;
  const lines = new Map();
  const lineAt = (pos) => text.slice(0, pos).split("\n").length;
  const skip = () => {
    for (;;) {
      while (i < text.length && " \t\r\n".includes(text[i])) i++;
      if (text.startsWith("//", i)) { const end = text.indexOf("\n", i); i = end < 0 ? text.length : end; }
      else if (text.startsWith("/*", i)) { const end = text.indexOf("*/", i + 2); if (end < 0) throw new SyntaxError("unclosed comment"); i = end + 2; }
      else return;
    }
  };
  const string = () => {
    const m = /^"(?:[^"\\\n]|\\.)*"/.exec(text.slice(i));
    if (!m) throw new SyntaxError(`string expected at line ${lineAt(i)}`);
    i += m[0].length;
    return JSON.parse(m[0]);
  };
  const value = (path) => {
    skip();
    lines.set(path, lineAt(i));
    const c = text[i];
    if (c === "{") {
      i++;
      const out = {};
      for (skip(); text[i] !== "}"; skip()) {
        const key = string();
        skip();
        if (text[i++] !== ":") throw new SyntaxError(`':' expected at line ${lineAt(i)}`);
        const keyPath = path ? `${path}.${key}` : key;
        out[key] = value(keyPath);
        skip();
        if (text[i] === ",") i++;
        else if (text[i] !== "}") throw new SyntaxError(`',' or '}' expected at line ${lineAt(i)}`);
      }
      i++;
      return out;
    }
    if (c === "[") {
      i++;
      const out = [];
      for (skip(); text[i] !== "]"; skip()) {
        out.push(value(`${path}[${out.length}]`));
        skip();
        if (text[i] === ",") i++;
        else if (text[i] !== "]") throw new SyntaxError(`',' or ']' expected at line ${lineAt(i)}`);
      }
      i++;
      return out;
    }
    if (c === '"') return string();
    const m = /^(?:true|false|null|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/.exec(text.slice(i));
    if (!m) throw new SyntaxError(`unexpected ${JSON.stringify(c ?? "end")} at line ${lineAt(i)}`);
    i += m[0].length;
    return JSON.parse(m[0]);
  };
  try {
    return { value: value(""), lines };
  } catch (e) {
    return { error: e.message, lines };
  }
}

// The line of `path`, or of the closest enclosing value that has one.
export function lineOf(lines, path) {
  for (let p = path; p;) {
    if (lines.has(p)) return lines.get(p);
    const enclosing = p.replace(/(\.[^.[\]]*|\[\d+\])$/, "");
    if (enclosing === p) break;
    p = enclosing;
  }
  return null;
}

// A line diff (longest common subsequence): [["=", line] | ["-", line] | ["+", line]].
export function diff(before, after) {
  const a = before.split("\n"), b = after.split("\n");
  if (a.length * b.length > 4e6) return null;  // too large to compare here
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let x = n - 1; x >= 0; x--) for (let y = m - 1; y >= 0; y--)
    lcs[x][y] = a[x] === b[y] ? lcs[x + 1][y + 1] + 1 : Math.max(lcs[x + 1][y], lcs[x][y + 1]);
  const out = [];
  let x = 0, y = 0;
  while (x < n && y < m) {
    if (a[x] === b[y]) { out.push(["=", a[x]]); x++; y++; }
    else if (lcs[x + 1][y] >= lcs[x][y + 1]) out.push(["-", a[x++]]);
    else out.push(["+", b[y++]]);
  }
  while (x < n) out.push(["-", a[x++]]);
  while (y < m) out.push(["+", b[y++]]);
  return out;
}
