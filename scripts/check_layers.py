"""Fails if the top-level modules of src/ import each other in a cycle.

Edges are `crate::<module>` paths in the files of a module (src/<module>.rs or
src/<module>/**), and `super::` stays inside a module. Test-only files (`tests.rs`) are left
out: a service's unit tests compose it with a real backend, as `startup` does. Prints the module graph, then every
cycle found (strongly connected components of more than one module). Run by .ci/run.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def modules():
    mods = {}
    for entry in sorted(os.listdir(SRC)):
        path = os.path.join(SRC, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            mods[entry[:-3]] = [path]
        elif os.path.isdir(path):
            files = []
            for root, _, names in os.walk(path):
                files += [
                    os.path.join(root, n)
                    for n in names
                    if n.endswith(".rs") and n != "tests.rs"
                ]
            mods[entry] = files
            if os.path.exists(path + ".rs"):
                mods[entry].append(path + ".rs")
    return mods


def graph(mods):
    edges = {m: set() for m in mods}
    pattern = re.compile(r"crate::([a-z_]+)")
    for m, files in mods.items():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for dep in pattern.findall(fh.read()):
                    if dep in mods and dep != m:
                        edges[m].add(dep)
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    edges = graph(modules())
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    found = cycles(edges)
    for c in found:
        print(f"CYCLE: {' <-> '.join(c)}", file=sys.stderr)
    if found:
        sys.exit(1)
    print("check_layers: no import cycles between the modules of src/")


if __name__ == "__main__":
    main()
