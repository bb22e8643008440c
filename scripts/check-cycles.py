#!/usr/bin/env python3
"""Fails when a crate of the workspace has an import cycle between its modules.

Usage: scripts/check-cycles.py [CRATE_SRC_DIR...]   (default: every crate of the workspace)

Each source file is one module (`a/b.rs` and `a/b/mod.rs` are `a::b`). An edge A -> B is any
path in A's code (use trees and paths in expressions, test modules included) that names an
item of B: `crate::..`, `super::..` (resolved from the inline module it is written in) and
`self::..`. A path resolves to the longest module prefix that exists. Edges from a module to
its own descendants are ownership (declaring, re-exporting) and do not count; every other
edge does, so a child that uses its parent and the parent's sibling modules that use each
other are what a cycle is made of. Prints each cycle (a strongly connected component of more
than one module) with one line per edge and the source line that makes it.
"""
import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text):
    """Blanks comments, string and char literals (keeps line breaks, so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 130]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # a char literal ('a', '\n', '\u{..}') or a lifetime ('a): only literals are blanked
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def file_module(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        return ()
    return tuple(rel)


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (as segment lists)."""
    tree = re.sub(r"\s+", "", tree)
    results = []

    def walk(prefix, s):
        # s is one use tree: path segments, optionally ending in {group} or * or `as` alias
        m = re.match(r"^((?:" + IDENT + r"::)*)(\{.*\}|\*|" + IDENT + r")(?:as" + IDENT + r")?$", s)
        if not m:
            return
        segs = [x for x in m.group(1).split("::") if x]
        last = m.group(2)
        if last.startswith("{"):
            for part in split_top(last[1:-1]):
                walk(prefix + segs, part)
        elif last == "*":
            results.append(prefix + segs)
        else:
            results.append(prefix + segs + [last])

    walk([], tree)
    return results


def split_top(s):
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur):
        parts.append("".join(cur))
    return [p for p in parts if p]


def inline_module_at(code, base):
    """For each offset, the inline module path (list) that encloses it, relative to the file."""
    # Returns a function offset -> list of inline module names.
    spans = []  # (start, end, name, depth)
    stack = []  # (name or None, brace position)
    pending = None
    i = 0
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{|[{}]", code):
        tok = m.group(0)
        if tok.startswith("mod"):
            stack.append((m.group(1), m.end()))
        elif tok == "{":
            stack.append((None, m.end()))
        else:
            if stack:
                name, start = stack.pop()
                if name:
                    spans.append((start, m.start(), name))
    del pending, i

    def at(offset):
        names = [(s, name) for (s, e, name) in spans if s <= offset <= e]
        names.sort()
        return [name for _, name in names]

    return at


def paths_in(code):
    """Yields (offset, segments, kind) for every crate/super/self path in the code."""
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        tree = m.group(1)
        for segs in expand_use_tree(tree):
            if segs and segs[0] in ("crate", "super", "self"):
                yield m.start(), segs
    no_use = re.sub(r"\buse\s+[^;]+;", lambda m: re.sub(r"[^\n]", " ", m.group(0)), code)
    for m in re.finditer(r"\b(crate|super|self)((?:\s*::\s*" + IDENT + r")+)", no_use):
        segs = [m.group(1)] + [s for s in re.split(r"\s*::\s*", m.group(2)) if s]
        yield m.start(), segs


def resolve(segs, here, modules):
    """Absolute segment list for a path written in module `here` (a tuple incl. inline mods)."""
    cur = list(here)
    i = 0
    if segs[0] == "crate":
        cur, i = [], 1
    elif segs[0] == "self":
        i = 1
    while i < len(segs) and segs[i] == "super":
        cur = cur[:-1]
        i += 1
    absolute = cur + segs[i:]
    # longest prefix that is a file module
    for k in range(len(absolute), -1, -1):
        if tuple(absolute[:k]) in modules:
            return tuple(absolute[:k])
    return ()


def tarjan(nodes, edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def check(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, root) == "main.rs" and os.path.exists(os.path.join(root, "lib.rs")):
                    continue  # the binary is its own crate
                files[file_module(root, path)] = path
    modules = set(files)
    edges, why = {}, {}
    for mod, path in files.items():
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        code = strip_comments_and_strings(raw)
        enclosing = inline_module_at(code, mod)
        for offset, segs in paths_in(code):
            here = tuple(mod) + tuple(enclosing(offset))
            target = resolve(segs, here, modules)
            if target == mod or target[: len(mod)] == mod:
                continue  # itself or a descendant: ownership
            edges.setdefault(mod, set()).add(target)
            line = code.count("\n", 0, offset) + 1
            why.setdefault((mod, target), (path, line, raw.splitlines()[line - 1].strip()))
    cycles = [c for c in tarjan(modules, edges) if len(c) > 1]
    name = lambda m: "::".join(m) or "crate"
    for comp in cycles:
        members = set(comp)
        print(f"{root}: import cycle among {', '.join(sorted(name(m) for m in comp))}")
        for a in sorted(comp):
            for b in sorted(edges.get(a, ())):
                if b in members:
                    path, line, text = why[(a, b)]
                    print(f"  {name(a)} -> {name(b)}   {path}:{line}: {text}")
    return len(cycles)


def main():
    roots = sys.argv[1:] or ["src", "store/src", "replication/src", "ha/src"]
    total = sum(check(r) for r in roots)
    if total:
        print(f"check-cycles: {total} cycle(s)")
        return 1
    print(f"check-cycles: no import cycle in {', '.join(roots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
