#!/usr/bin/env python3
"""Mutation testing of fanin: a seeded sample of cosmic-ray mutants per target, each judged by
the target's tests on a private copy of the repository, with a fresh Numba cache per mutant.

    python tools/mutation/run.py [--mutants 60] [--seed 0] [--workers 2] [--targets kernels,ops]
    make mutation MUTANTS=60 SEED=0 WORKERS=2 TARGETS=kernels,ops

What it does (docs/TESTING.md has the why):
1. copies the repository (git's tracked and untracked-but-not-ignored files, or `--rev REV`'s
   tree) into one folder per worker under a temporary directory; the source tree is never
   written to;
2. lists every mutant of cosmic-ray's operators in each target's files, drops the rules of
   config.toml's [[exclude]], and draws a seeded sample: mutation sites (file + source span) in
   a seeded random order, one mutant per site, `--mutants` per target;
3. marks the mutants listed in equivalent.toml as equivalent (not run, not in the score);
4. runs the unmutated tests once with an empty Numba cache to fill it ("warm cache"), then each
   target's tests once on that cache: the target's "baseline" (it must pass; timeout_factor x
   its time is the per-mutant limit, plus compile_allowance if the mutant recompiles);
5. for each mutant: writes the mutated file with a new mtime, copies the warm cache minus the
   compiled code of the mutated Numba function and of every compiled function that refers to it
   (the rest of the mutated file's cache is re-stamped), runs the target's tests with pytest -x,
   and puts the original file and mtime back;
6. draws more mutants for a target while fewer than `--mutants` were judged (top_up), and
   writes a JSON file (every mutant, its diff and outcome) and a Markdown report.

Outcomes: killed (a test failed or the run crashed), timeout (counted as killed), survived
(every test passed), incompetent (a mutant inside a Numba-compiled function that Numba refused
to compile: no test can judge it), equivalent (listed in equivalent.toml).
Score = (killed + timeout) / judged, judged = killed + timeout + survived. With top_up (the
default) mutants are drawn until `--mutants` of them per target are judged.
"""
from __future__ import annotations

import argparse
import ast as pyast
import collections
import concurrent.futures
import dataclasses
import datetime
import difflib
import fnmatch
import functools
import glob
import hashlib
import json
import os
import platform
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_toml(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
        return tomllib.loads(text)
    except ModuleNotFoundError:  # Python 3.10: cosmic-ray depends on `toml`
        import toml
        return toml.loads(text)


# ------------------------------------------------------------------ mutants
@dataclasses.dataclass
class Mutant:
    target: str
    group: str
    file: str              # path relative to the repository root
    operator: str          # cosmic-ray operator name, e.g. core/ReplaceBinaryOperator_Add_Sub
    occurrence: int        # cosmic-ray's occurrence index of this operator in this file
    start: tuple           # (line, column) of the mutated node
    end: tuple
    line_text: str         # the original source line of `start`, stripped
    line_occurrence: int   # index among this file's mutants with the same operator and line text
    function: str | None = None
    jit: bool = False      # inside a Numba-compiled function
    in_def: bool = False   # inside a function (compiled or not), not at module or class level
    lines_changed: bool = False  # the mutated file has another number of lines
    mutated_line: str = ""
    diff: str = ""
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0
    timeout_s: float = 0.0
    killed_by: str = ""
    returncode: int | None = None
    recompiled: list = dataclasses.field(default_factory=list)  # compiled functions it invalidates
    code: str = dataclasses.field(default="", repr=False)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.start[0]}:{self.operator}:{self.occurrence}"


def operators():
    import cosmic_ray.plugins as plugins
    for name in sorted(plugins.operator_names()):
        cls = plugins.get_operator(name)
        if cls.arguments():  # VariableReplacer/VariableInserter need arguments (and are random)
            continue
        yield name, cls()


TWINS = ("twins", "_twins")  # helpers that compile one body twice: parallel as is, serial as "<name>_serial"


def compiled_by_call(tree, source: str, jit_re: re.Pattern) -> tuple[set, set]:
    """Functions handed to Numba by a call instead of a decorator: ``njit(...)(f)`` (e.g. in a factory that
    returns a specialised closure) and ``twins(f)``. Returns (names, twinned): the bare function names, and
    those of them that also get a serial copy named ``<name>_serial``."""
    names, twinned = set(), set()
    for node in pyast.walk(tree):
        if not (isinstance(node, pyast.Call) and node.args and isinstance(node.args[0], pyast.Name)):
            continue
        fn, arg = node.func, node.args[0].id
        if isinstance(fn, pyast.Call) and jit_re.search(pyast.get_source_segment(source, fn) or ""):
            names.add(arg)
        elif (fn.id if isinstance(fn, pyast.Name) else getattr(fn, "attr", "")) in TWINS:
            names.add(arg)
            serial = [k for k in node.keywords if k.arg == "serial"]
            if not (serial and isinstance(serial[0].value, pyast.Constant) and serial[0].value.value is False):
                twinned.add(arg)
    return names, twinned


def call_aliases(tree, compiled: set, twinned: set) -> dict:
    """Module-level names bound to compiled code by a call: ``a, b = twins(f)`` -> {f, f_serial};
    ``g = factory(...)``, where ``factory`` defines compiled closures -> their names. Compiled callers refer
    to these names, so a change to the underlying function must reach them too."""
    factories = {}
    for node in tree.body:
        if isinstance(node, pyast.FunctionDef):
            inner = {n.name for n in pyast.walk(node) if isinstance(n, pyast.FunctionDef) and n is not node
                     and n.name in compiled}
            if inner:
                factories[node.name] = inner
    out = {}
    for node in tree.body:
        if not (isinstance(node, pyast.Assign) and isinstance(node.value, pyast.Call)):
            continue
        call = node.value
        fname = call.func.id if isinstance(call.func, pyast.Name) else getattr(call.func, "attr", "")
        if fname in TWINS and call.args and isinstance(call.args[0], pyast.Name):
            arg = call.args[0].id
            under = {arg, arg + "_serial"} if arg in twinned else {arg}
        elif fname in factories:
            under = factories[fname]
        else:
            continue
        for target in node.targets:
            for n in pyast.walk(target):
                if isinstance(n, pyast.Name):
                    out[n.id] = under
    return out



def function_spans(source: str, jit_re: re.Pattern) -> list:
    """(first line, last line, qualified name, is_jit, is_function) of every function and class,
    outer ones first."""
    spans = []
    tree = pyast.parse(source)
    compiled, _ = compiled_by_call(tree, source, jit_re)

    def visit(node, prefix, jit_outer):
        for child in pyast.iter_child_nodes(node):
            if isinstance(child, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
                name = f"{prefix}{child.name}"
                jit = jit_outer
                if not isinstance(child, pyast.ClassDef):
                    decos = [pyast.get_source_segment(source, d) or "" for d in child.decorator_list]
                    jit = jit or any(jit_re.search(d) for d in decos) or child.name in compiled
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.append((first, child.end_lineno, name, jit, not isinstance(child, pyast.ClassDef)))
                visit(child, name + ".", jit)
            else:
                visit(child, prefix, jit_outer)

    visit(tree, "", False)
    return spans


def enumerate_mutants(repo: Path, target: dict, cfg: dict, excludes: list) -> list[Mutant]:
    from cosmic_ray.ast import ast_nodes, get_ast
    jit_re = re.compile(cfg["jit_decorator"])
    files = sorted({p for pat in target["paths"] for p in glob.glob(str(repo / pat))})
    ops = list(operators())
    out = []
    for f in files:
        rel = str(Path(f).relative_to(repo))
        source = Path(f).read_text(encoding="utf-8")
        lines = source.splitlines()
        spans = function_spans(source, jit_re)
        tree = get_ast(source)
        nodes = list(ast_nodes(tree))
        for name, op in ops:
            occurrence = 0
            seen = collections.Counter()
            for node in nodes:
                for start, end in op.mutation_positions(node):
                    text = lines[start[0] - 1].strip()
                    inner = [s for s in spans if s[0] <= start[0] <= s[1]]
                    m = Mutant(target=target["name"], group=target["group"], file=rel, operator=name,
                               occurrence=occurrence, start=tuple(start), end=tuple(end), line_text=text,
                               line_occurrence=seen[text],
                               function=inner[-1][2] if inner else None,
                               jit=bool(inner) and inner[-1][3], in_def=any(s[4] for s in inner))
                    seen[text] += 1
                    occurrence += 1
                    if not any(rule_matches(r, m) for r in excludes):
                        out.append(m)
    return out


def rule_matches(rule: dict, m: Mutant) -> bool:
    if "operator" in rule and rule["operator"] != m.operator:
        return False
    if "file" in rule and not fnmatch.fnmatch(m.file, rule["file"]):
        return False
    if "line" in rule and not re.search(rule["line"], m.line_text):
        return False
    return True


def equivalent_matches(entry: dict, m: Mutant) -> bool:
    """equivalent.toml entries name a mutant by file (a glob), original line text (stripped,
    exact) and optionally operator, mutated line text, function and occurrence (see that file)."""
    if not fnmatch.fnmatch(m.file, entry.get("file", "")) or entry.get("line") != m.line_text:
        return False
    if "operator" in entry and entry["operator"] != m.operator:
        return False
    if "mutated" in entry and entry["mutated"] != m.mutated_line:
        return False
    if "function" in entry and entry["function"] != m.function:
        return False
    if "occurrence" in entry and entry["occurrence"] != m.line_occurrence:
        return False
    return True


def draw_order(mutants: list[Mutant], seed: int, target: str) -> list[Mutant]:
    """Every mutation site (file + source span) in a seeded random order, with one of the site's
    mutants (drawn with a seed of its own): every place in the code is equally likely, however
    many operators apply there. The sample is a prefix of this order."""
    sites = collections.defaultdict(list)
    for m in mutants:
        sites[(m.file, m.start, m.end)].append(m)
    keys = sorted(sites)
    random.Random(f"{seed}/{target}").shuffle(keys)
    return [random.Random(f"{seed}/{k}").choice(sites[k]) for k in keys]


def materialise(repo: Path, m: Mutant, cfg: dict) -> None:
    """Fill in the mutated source, the mutated line and the diff."""
    import cosmic_ray.plugins as plugins
    from cosmic_ray.mutating import mutate_code
    source = (repo / m.file).read_text(encoding="utf-8")
    code = mutate_code(source, plugins.get_operator(m.operator)(), m.occurrence)
    if code is None:
        raise RuntimeError(f"cosmic-ray did not apply {m.id}")
    a, b = source.splitlines(), code.splitlines()
    if m.operator == "core/ZeroIterationForLoop" and m.jit:
        # Numba cannot type an empty list literal; range(0) is the same loop of zero iterations
        i = m.start[0] - 1
        b[i] = re.sub(r"\[\](\s*):", r"range(0)\1:", b[i], count=1)
        code = "\n".join(b) + ("\n" if code.endswith("\n") else "")
    m.code = code
    m.diff = "\n".join(difflib.unified_diff(a, b, f"a/{m.file}", f"b/{m.file}", lineterm="", n=1))
    changed = [j for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes()
               if tag != "equal" for j in range(j1, j2)]
    m.mutated_line = b[changed[0]].strip() if changed else ""
    m.lines_changed = len(a) != len(b)


# ------------------------------------------------------------------ Numba cache handling
# Numba's on-disk cache (cache=True) keeps one index per compiled function, named
# "<module stem>.<qualname>-<first line>.py<version>.nbi", in one folder per source folder, and
# trusts it while the source file's (mtime, size) stamp is unchanged. It does not record which
# functions a compiled function called: a caller in another file keeps the callee's old machine
# code when only the callee's file changed. So for each mutant the runner removes the cached code
# of the mutated compiled function and of every compiled function that refers to it (by name,
# transitively, across the package), and re-stamps the other indexes of the mutated file, whose
# code did not change. Everything else is reused from the warm cache.

@dataclasses.dataclass(frozen=True)
class JitFn:
    file: str         # path relative to the repository
    stem: str         # module file name without .py
    qualname: str
    first: int        # first line (its first decorator): part of Numba's cache file names
    last: int
    refs: frozenset   # names it uses, read through its module's `from x import a as b` aliases

    @property
    def short(self) -> str:
        return self.qualname.rpartition(".")[2]


class JitIndex:
    """Every Numba-compiled function of the package, and who refers to whom."""

    def __init__(self, repo: Path, package: str, jit_re: re.Pattern):
        self.fns: list[JitFn] = []
        parsed = []
        self.bound = {}  # names bound to compiled code by a call (call_aliases), across the package
        # plain module-level functions that hand code to Numba when called (factories, _jit.clone families):
        # what they compile depends on more than its source (a swapped global), so a mutant in them
        # invalidates the whole file's cached code, file -> {name}
        self.builders = collections.defaultdict(set)
        for path in sorted((repo / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            if not jit_re.pattern or not any(w in source for w in ("@", "njit(", "twins(")):
                continue
            tree = pyast.parse(source)
            compiled, twinned = compiled_by_call(tree, source, jit_re)
            self.bound.update(call_aliases(tree, compiled, twinned))
            parsed.append((path, source, tree, compiled, twinned))
            for node in tree.body:
                if isinstance(node, pyast.FunctionDef) and node.name not in compiled and re.search(
                        r"\b(njit|jit|twins|clone)\(", pyast.get_source_segment(source, node) or ""):
                    self.builders[str(path.relative_to(repo))].add(node.name)
        for path, source, tree, compiled, twinned in parsed:
            aliases = {a.asname or a.name: a.name for node in pyast.walk(tree)
                       if isinstance(node, pyast.ImportFrom) for a in node.names}
            rel = str(path.relative_to(repo))
            self._visit(tree, "", source, rel, path.stem, aliases, jit_re, compiled, twinned)

    def _visit(self, node, prefix, source, rel, stem, aliases, jit_re, compiled, twinned):
        for child in pyast.iter_child_nodes(node):
            if isinstance(child, (pyast.FunctionDef, pyast.AsyncFunctionDef)):
                decos = [pyast.get_source_segment(source, d) or "" for d in child.decorator_list]
                if any(jit_re.search(d) for d in decos) or child.name in compiled:
                    refs = set()
                    for n in pyast.walk(child):
                        if isinstance(n, pyast.Name):
                            refs.add(aliases.get(n.id, n.id))
                        elif isinstance(n, pyast.Attribute):
                            refs.add(n.attr)
                    refs |= {u for r in list(refs) for u in self.bound.get(r, ())}
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    names = [child.name] + ([child.name + "_serial"] if child.name in twinned else [])
                    for name in names:
                        self.fns.append(JitFn(rel, stem, prefix + name, first, child.end_lineno, frozenset(refs)))
                else:
                    self._visit(child, f"{prefix}{child.name}.<locals>.", source, rel, stem, aliases, jit_re,
                                compiled, twinned)
            elif isinstance(child, pyast.ClassDef):
                self._visit(child, f"{prefix}{child.name}.", source, rel, stem, aliases, jit_re, compiled, twinned)

    def in_file(self, file: str) -> list[JitFn]:
        return [f for f in self.fns if f.file == file]

    def affected(self, m: "Mutant", mode: str) -> list[JitFn]:
        """The compiled functions whose cached code a mutant makes wrong."""
        mine = self.in_file(m.file)
        if mode == "module" or m.lines_changed:
            seeds = mine
        elif m.jit:
            seeds = [f for f in mine if f.first <= m.start[0] <= f.last]
        elif m.in_def and (m.function or "").split(".")[0] in self.builders.get(m.file, ()):
            # a function that compiles code (see builders): everything it may have built -- in its own file, or,
            # for a helper with no compiled code of its own (_jit.twins, _jit.clone), in the whole package
            seeds = mine or list(self.fns)
        elif m.in_def:
            # a plain Python function: no compiled code changes, unless compiled code calls it at compile time
            # (an intrinsic's code generator, a helper that builds constants): then its users recompile
            top = (m.function or "").split(".")[0]
            seeds = [f for f in mine if top in f.refs]
        else:
            seeds = mine  # module level: a global that compiled code may have frozen in
        hit, names = set(seeds), {f.short for f in seeds}
        grew = True
        while grew:
            grew = False
            for f in self.fns:
                if f not in hit and f.refs & names:
                    hit.add(f)
                    names.add(f.short)
                    grew = True
        return sorted(hit, key=lambda f: (f.file, f.first))


def numba_subdir(py_file: Path) -> str:
    """The folder Numba's cache uses for py_file under NUMBA_CACHE_DIR (numba.core.caching)."""
    d = os.path.dirname(os.path.abspath(py_file))
    return f"{os.path.split(d)[-1]}_{hashlib.sha1(d.encode()).hexdigest()}"


def restamp_index(path: Path, source: Path) -> None:
    """Rewrite a Numba cache index as if it had been written for the source file as it is now.
    Numba 0.68 stamps an index with the SHA-256 of the source file; older versions used the
    file's (mtime, size): keep whichever form the index has."""
    import pickle
    with open(path, "rb") as f:
        version = pickle.load(f)
        data = f.read()
    old, overloads = pickle.loads(data)
    if isinstance(old, bytes):
        stamp = hashlib.sha256(source.read_bytes()).digest()
    else:
        st = source.stat()
        stamp = (st.st_mtime, st.st_size)
    with open(path, "wb") as f:
        pickle.dump(version, f, protocol=-1)
        f.write(pickle.dumps((stamp, overloads), protocol=-1))


class Worker:
    def __init__(self, index: int, root: Path):
        self.index = index
        self.root = root
        self.repo = root / "repo"
        self.warm = root / "cache-warm"
        self.cache = root / "cache"

    def fresh_cache(self, drop: list[JitFn], restamp: str | None = None, cold: bool = False) -> None:
        """cache := cache-warm minus the compiled code of `drop`; restamp (a file relative to the
        repository) re-stamps the remaining indexes of that file; cold: an empty cache."""
        if self.cache.exists():
            shutil.rmtree(self.cache)
        if cold or not self.warm.exists():
            self.cache.mkdir(parents=True)
            return
        skip = collections.defaultdict(set)
        for f in drop:
            name = f"{f.stem}.{f.qualname.replace('<locals>', 'locals')}"
            # "-": its own entries; "_": copies compiled under a suffixed name (a twin's "_serial", a
            # kernels._jit.clone such as infer's "_half" drivers), which keep the same body (a prefix that
            # also matches an unrelated longer name only costs a recompilation)
            skip[numba_subdir(self.repo / f.file)].update((name + "-", name + "_"))

        def ignore(directory, names):
            prefixes = skip.get(os.path.basename(directory))
            return [n for n in names if any(n.startswith(p) for p in prefixes)] if prefixes else []

        shutil.copytree(self.warm, self.cache, ignore=ignore)
        if restamp:
            folder = self.cache / numba_subdir(self.repo / restamp)
            for index in folder.glob(f"{Path(restamp).stem}.*.nbi"):
                restamp_index(index, self.repo / restamp)


def forget_bytecode(worker: "Worker", path: Path) -> None:
    """Delete the .pyc files of `path`, and Numba cache files that a test's subprocess (started
    without NUMBA_CACHE_DIR) left in the worker's tree: neither may outlive a mutant."""
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)
    for pattern in ("*.nbi", "*.nbc"):
        for f in worker.repo.rglob(pattern):
            f.unlink(missing_ok=True)


def run_pytest(worker: Worker, tests: list[str], args: list[str], timeout: float | None, bytecode=False):
    """(returncode or None on timeout, output, seconds)."""
    shutil.rmtree(worker.repo / ".hypothesis", ignore_errors=True)
    env = dict(os.environ)
    env.update(NUMBA_CACHE_DIR=str(worker.cache), PYTHONHASHSEED="0")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not bytecode:  # a mutant's .pyc must never be written (nor outlive it)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", *args, *tests]
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=worker.repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait()
            rc = None
        dt = time.monotonic() - t0
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return rc, text, dt


# ------------------------------------------------------------------ the run
def git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def copy_source(source: Path, dest: Path, rev: str | None) -> dict:
    dest.mkdir(parents=True)
    info = {"source": str(source)}
    if (source / ".git").exists() or rev:
        info["head"] = git(source, "rev-parse", "HEAD").strip()
    if rev:
        info["rev"] = git(source, "rev-parse", rev).strip()
        archive = subprocess.run(["git", "-C", str(source), "archive", "--format=tar", rev],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-xf", "-", "-C", str(dest)], input=archive, check=True)
        return info
    if (source / ".git").exists():
        files = git(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
        info["dirty"] = bool(git(source, "status", "--porcelain", "--untracked-files=no").strip())
    else:
        skip = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "build"}
        files = [str(p.relative_to(source)) for p in source.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(source).parts)]
    for f in filter(None, files):
        src = source / f
        if src.is_file() and not src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return info


def clone_worker(src: Worker, dst: Worker, package: str) -> None:
    """dst := src (tree with mtimes, and the warm cache with Numba's per-folder names redone)."""
    shutil.copytree(src.repo, dst.repo, symlinks=True)
    dst.warm.mkdir(parents=True)
    renames = {}
    for d in [src.repo / package, *(p for p in (src.repo / package).rglob("*") if p.is_dir())]:
        renames[numba_subdir(d / "x.py")] = numba_subdir(dst.repo / d.relative_to(src.repo) / "x.py")
    for entry in src.warm.iterdir():
        shutil.copytree(entry, dst.warm / renames.get(entry.name, entry.name))


def existing_tests(repo: Path, patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        for p in sorted(glob.glob(str(repo / pat))):
            rel = str(Path(p).relative_to(repo))
            if rel not in out:
                out.append(rel)
    return out


def lscpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument("--config", type=Path, default=HERE / "config.toml")
    ap.add_argument("--equivalent", type=Path, default=HERE / "equivalent.toml")
    ap.add_argument("--repo", type=Path, default=HERE.parent.parent, help="repository to copy (default: this one)")
    ap.add_argument("--rev", default=env("REV") or None,
                    help="test this git revision's tree (env REV) instead of the working tree")
    ap.add_argument("--mutants", type=int, default=int(env("MUTANTS")) if env("MUTANTS") else None,
                    help="judged mutants per target (env MUTANTS; default from config.toml)")
    ap.add_argument("--seed", type=int, default=int(env("SEED")) if env("SEED") else None, help="env SEED")
    ap.add_argument("--workers", type=int, default=int(env("WORKERS")) if env("WORKERS") else None,
                    help="env WORKERS")
    ap.add_argument("--targets", default=env("TARGETS") or None,
                    help="comma-separated target names (env TARGETS; default: all)")
    ap.add_argument("--timeout-factor", type=float)
    ap.add_argument("--workdir", type=Path, help="where the copies go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--list", action="store_true", help="only list the first draw of the sample (no tests run)")
    ap.add_argument("--ids", help="run only these mutants (comma-separated ids as in the report)")
    ap.add_argument("--cache", choices=("function", "module", "cold"), default="function",
                    help="per mutant, recompile the mutated compiled function and its callers (default), "
                         "every compiled function of the mutated file and their callers, or everything")
    ap.add_argument("--rescore", type=Path, metavar="JSON",
                    help="apply equivalent.toml again to the mutants of an earlier run's JSON and rewrite "
                         "--out and --md (no tests run; no top-up: a target may then have fewer judged)")
    ap.add_argument("--out", type=Path, default=HERE / "last-run.json")
    ap.add_argument("--md", type=Path, help="Markdown report (default: --out with .md)")
    args = ap.parse_args(argv)

    if args.rescore:
        return rescore(args)
    cfg_all = load_toml(args.config)
    cfg = cfg_all["run"]
    n = args.mutants if args.mutants is not None else cfg["mutants"]
    seed = args.seed if args.seed is not None else cfg["seed"]
    n_workers = max(1, args.workers if args.workers is not None else cfg["workers"])
    factor = args.timeout_factor or cfg["timeout_factor"]
    package = cfg.get("package", "fanin")
    targets = cfg_all["target"]
    if args.targets:
        wanted = args.targets.split(",")
        unknown = set(wanted) - {t["name"] for t in targets}
        if unknown:
            ap.error(f"unknown targets {sorted(unknown)}; config.toml has {[t['name'] for t in targets]}")
        targets = [t for t in targets if t["name"] in wanted]
    equivalents = load_toml(args.equivalent).get("mutant", []) if args.equivalent.exists() else []
    md_path = args.md or args.out.with_suffix(".md")
    t_start = time.monotonic()
    started = datetime.datetime.now().astimezone()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fanin-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    workers = [Worker(i, work / f"w{i}") for i in range(n_workers)]
    log = functools.partial(print, flush=True)
    log(f"work folder: {work}")
    try:
        source_info = copy_source(args.repo.resolve(), workers[0].repo, args.rev)
        repo0 = workers[0].repo
        jits = JitIndex(repo0, package, re.compile(cfg["jit_decorator"]))
        by_name = {f"{f.stem}.{f.qualname}": f for f in jits.fns}

        # ---- the sample: per target, every mutation site in a seeded random order
        orders, universe, sample = {}, {}, []
        for t in targets:
            everything = enumerate_mutants(repo0, t, cfg, cfg_all.get("exclude", []))
            orders[t["name"]] = collections.deque(draw_order(everything, seed, t["name"]))
            universe[t["name"]] = {"mutants": len(everything), "sites": len(orders[t["name"]])}
            log(f"{t['name']}: {len(everything)} mutants at {len(orders[t['name']])} sites")

        def draw(name: str, k: int) -> list[Mutant]:
            """The next k mutants of a target that are not known to be equivalent (and those that are)."""
            out = []
            while k > 0 and orders[name]:
                m = orders[name].popleft()
                materialise(repo0, m, cfg)
                m.recompiled = [f"{f.stem}.{f.qualname}" for f in jits.affected(m, args.cache)]
                for e in equivalents:
                    if equivalent_matches(e, m):
                        m.status, m.reason = "equivalent", e.get("reason", "")
                        break
                else:
                    k -= 1
                out.append(m)
            return out

        if args.ids:
            wanted = set(args.ids.split(","))
            for t in targets:
                orders[t["name"]] = collections.deque(m for m in orders[t["name"]] if m.id in wanted)
                sample += draw(t["name"], len(orders[t["name"]]))
            if len(sample) != len(wanted):
                ap.error(f"no such mutants in the targets: {sorted(wanted - {m.id for m in sample})}")
        else:
            for t in targets:
                sample += draw(t["name"], n)
        if args.list:
            for m in sample:
                print(f"{m.id}  [{m.status}] recompiles {len(m.recompiled)}\n"
                      f"    - {m.line_text}\n    + {m.mutated_line}")
            return 0

        tests = {t["name"]: existing_tests(repo0, t["tests"]) for t in targets}
        for t in targets:
            missing = [p for p in t["tests"] if not glob.glob(str(repo0 / p))]
            if missing:
                log(f"{t['name']}: no such test files (skipped): {missing}")
        pytest_args = list(cfg["pytest_args"])

        # ---- warm cache: the unmutated tests once, then copies for the other workers
        all_tests = []
        for t in targets:
            all_tests += [x for x in tests[t["name"]] if x not in all_tests]
        w0 = workers[0]
        w0.cache = w0.warm
        rc, out, prewarm_s = run_pytest(w0, all_tests, [a for a in pytest_args if a != "-x"], None,
                                        bytecode=True)
        w0.cache = w0.root / "cache"
        log(f"warm-up (unmutated, {len(all_tests)} test files, empty cache): {prewarm_s:.1f} s, exit {rc}")
        if rc != 0:
            log(out[-5000:])
            log("The unmutated tests fail: fix them first.")
            return 2
        # Python must import the package from the copy, not from an installed tree
        probe = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__file__)"],
                               cwd=w0.repo, capture_output=True, text=True).stdout.strip()
        if not probe.startswith(str(w0.repo)):
            log(f"{package} is imported from {probe!r}, not from the copy {w0.repo}")
            return 2
        for w in workers[1:]:
            clone_worker(w0, w, package)
        allowance = prewarm_s if args.cache == "cold" else min(prewarm_s, cfg["compile_allowance"])

        # ---- baselines: each target's tests, unmutated, warm cache (also proves the copies are warm)
        free = queue.Queue()
        for w in workers:
            free.put(w)

        def do_baseline(name):
            w = free.get()
            try:
                w.fresh_cache([])
                return (name, w.index, *run_pytest(w, tests[name], pytest_args, None))
            finally:
                free.put(w)

        baselines = {}
        with concurrent.futures.ThreadPoolExecutor(n_workers) as ex:
            for name, wi, rc, out, dt in ex.map(do_baseline, [t["name"] for t in targets]):
                baselines[name] = dt
                log(f"baseline {name} (worker {wi}, warm cache): {dt:.1f} s, exit {rc}")
                if rc != 0:
                    log(out[-5000:])
                    log("An unmutated baseline fails: fix the tests (or the test list in config.toml) first.")
                    return 2

        # ---- the mutants
        compile_re = re.compile(cfg["compile_error"])
        lock = threading.Lock()
        done = [0, 0]  # finished, started

        def do_mutant(m: Mutant):
            w = free.get()
            path = w.repo / m.file
            st = path.stat()
            original = path.read_bytes()
            with lock:
                done[1] += 1
                offset = 10 + done[1]
            try:
                forget_bytecode(w, path)
                path.write_bytes(m.code.encode("utf-8"))
                # An mtime no other version of this file ever had: a .pyc that some subprocess
                # wrote (tests may start Python with a clean environment, which writes bytecode)
                # is then never taken for another mutant of the same size.
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + offset * 1_000_000_000))
                restamp = m.file if args.cache == "function" else None
                w.fresh_cache([by_name[r] for r in m.recompiled], restamp, cold=args.cache == "cold")
                recompiles = bool(m.recompiled) or args.cache == "cold"
                m.timeout_s = round(max(cfg["timeout_min"], factor * baselines[m.target])
                                    + (allowance if recompiles else 0), 1)
                rc, out, dt = run_pytest(w, tests[m.target], pytest_args, m.timeout_s)
            finally:
                path.write_bytes(original)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                forget_bytecode(w, path)
                free.put(w)
            m.seconds, m.returncode = round(dt, 2), rc
            if rc is None:
                m.status = "timeout"
            elif rc == 0:
                m.status = "survived"
            elif rc in (2, 3, 4, 5) and not re.search(r"^(FAILED|ERROR) ", out, re.M):
                m.status, m.reason = "error", f"pytest exit {rc}: " + out.strip().splitlines()[-1][:200]
            elif m.jit and compile_re.search(out):
                m.status, m.reason = "incompetent", compile_re.search(out).group(0)
            else:
                m.status = "killed"
                failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
                m.killed_by = failed[0] if failed else (f"signal {-rc}" if rc < 0 else f"exit {rc}")
            with lock:
                done[0] += 1
                log(f"[{done[0]}] {m.status:11s} {dt:6.1f} s  {m.id}  {m.killed_by or m.reason}")

        todo = [m for m in sample if m.status == "pending"]
        round_no = 1
        while todo:
            # long ones first (those that recompile, bigger test lists) so that the workers end together
            todo.sort(key=lambda m: (not (m.recompiled or args.cache == "cold"), -baselines[m.target]))
            log(f"round {round_no}: {len(todo)} mutants")
            with concurrent.futures.ThreadPoolExecutor(n_workers) as ex:
                list(ex.map(do_mutant, todo))
            if args.ids or not cfg.get("top_up", True):
                break
            # top up: draw more where Numba refused mutants or a run could not judge one
            todo = []
            for t in targets:
                judged = sum(m.status in ("killed", "timeout", "survived") for m in sample if m.target == t["name"])
                more = draw(t["name"], n - judged) if judged < n else []
                todo += [m for m in more if m.status == "pending"]
                sample += more
            round_no += 1

        # ---- report
        report = build_report(sample, targets, universe, baselines, tests, cfg, n, seed, n_workers, factor,
                              source_info, started, time.monotonic() - t_start, prewarm_s, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        md = markdown(report)
        md_path.write_text(md, encoding="utf-8")
        print()
        print(md)
        print(f"\nwrote {args.out} and {md_path}")
        return 0
    finally:
        if args.keep or args.workdir:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def tally(ms) -> dict:
    c = collections.Counter(m["status"] if isinstance(m, dict) else m.status for m in ms)
    detected = c["killed"] + c["timeout"]
    judged = detected + c["survived"]
    return {"sampled": len(ms), "equivalent": c["equivalent"], "incompetent": c["incompetent"],
            "error": c["error"], "killed": c["killed"], "timeout": c["timeout"], "survived": c["survived"],
            "judged": judged, "score": round(detected / judged, 4) if judged else None}


def rescore(args) -> int:
    r = json.loads(args.rescore.read_text(encoding="utf-8"))
    equivalents = load_toml(args.equivalent).get("mutant", []) if args.equivalent.exists() else []
    changed = 0
    for d in r["mutants"]:
        m = Mutant(**{k: (tuple(v) if k in ("start", "end") else v) for k, v in d.items()
                      if k in {f.name for f in dataclasses.fields(Mutant)}})
        entry = next((e for e in equivalents if equivalent_matches(e, m)), None)
        if entry and d["status"] != "equivalent":
            d["judged_as"], d["status"], d["reason"] = d["status"], "equivalent", entry.get("reason", "")
            changed += 1
        elif not entry and d["status"] == "equivalent":
            d["status"], d["reason"] = "not run", "was listed as equivalent when drawn; no longer"
            changed += 1
    for name, t in r["targets"].items():
        t.update(tally([d for d in r["mutants"] if d["target"] == name]))
    for g in r["groups"]:
        r["groups"][g] = tally([d for d in r["mutants"] if d["group"] == g])
    r["rescored"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    args.out.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    md = markdown(r)
    (args.md or args.out.with_suffix(".md")).write_text(md, encoding="utf-8")
    print(md)
    print(f"{changed} mutants changed status; wrote {args.out}")
    return 0


def build_report(sample, targets, universe, baselines, tests, cfg, n, seed, n_workers, factor, source_info,
                 started, elapsed, prewarm_s, args) -> dict:
    import cosmic_ray
    import numba
    try:
        from importlib.metadata import version
        cr_version = version("cosmic-ray")
    except Exception:  # noqa: BLE001
        cr_version = getattr(cosmic_ray, "__version__", "?")
    groups = []
    for t in targets:
        if t["group"] not in groups:
            groups.append(t["group"])
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": lscpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numba": numba.__version__, "cosmic_ray": cr_version},
        "source": source_info,
        "settings": {"mutants_per_target": n, "seed": seed, "workers": n_workers, "timeout_factor": factor,
                     "cache": args.cache, "ids": args.ids,
                     "timeout_min": cfg["timeout_min"], "pytest_args": cfg["pytest_args"]},
        "seconds": {"total": round(elapsed, 1), "warm_up": round(prewarm_s, 1)},
        "baseline_seconds": {k: round(v, 2) for k, v in baselines.items()},
        "targets": {t["name"]: {"group": t["group"], "tests": tests[t["name"]], **universe[t["name"]],
                                **tally([m for m in sample if m.target == t["name"]])} for t in targets},
        "groups": {g: tally([m for m in sample if m.group == g]) for g in groups},
        "mutants": [{"id": m.id, **{k: v for k, v in dataclasses.asdict(m).items() if k != "code"}}
                    for m in sample],
    }


def pct(x):
    return "–" if x is None else f"{100 * x:.1f} %"


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"Run of {r['date']}: `{r['command']}`, {s['mutants_per_target']} mutants per target, seed {s['seed']}, "
        f"{s['workers']} workers, on {r['machine']['cpu']} ({r['machine']['cores']} cores); "
        f"Python {r['machine']['python']}, Numba {r['machine']['numba']}, cosmic-ray {r['machine']['cosmic_ray']}; "
        f"source {r['source'].get('rev') or r['source'].get('head', '?')[:12]}"
        f"{' (working tree with changes)' if r['source'].get('dirty') else ''}. "
        f"Took {r['seconds']['total'] / 60:.1f} min (warm-up {r['seconds']['warm_up']:.0f} s)."
        + (f" Rescored with equivalent.toml on {r['rescored']}." if r.get("rescored") else ""),
        "",
        "| group | target | drawn | equivalent | incompetent | judged | killed | timeout | survived | score |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(group, target, t, bold=""):
        err = f" (+{t['error']} errors)" if t["error"] else ""
        return (f"| {bold}{group}{bold} | {target} | {t['sampled']}{err} | {t['equivalent']} | {t['incompetent']} | "
                f"{t['judged']} | {t['killed']} | {t['timeout']} | {t['survived']} | {bold}{pct(t['score'])}{bold} |")

    for name, t in r["targets"].items():
        lines.append(row(t["group"], name, t))
    for g, t in r["groups"].items():
        lines.append(row(g, "all", t, "**"))
    lines += ["", "Score = (killed + timeout) / judged; judged = killed + timeout + survived "
              "(equivalent and incompetent mutants are drawn in addition).", ""]
    surv = [m for m in r["mutants"] if m["status"] == "survived"]
    lines.append(f"### Surviving mutants ({len(surv)})")
    by_file = collections.defaultdict(list)
    for m in surv:
        by_file[m["file"]].append(m)
    for f in sorted(by_file):
        lines += ["", f"#### {f}", ""]
        for m in sorted(by_file[f], key=lambda m: (m["start"][0], m["operator"])):
            lines.append(f"- `{f}:{m['start'][0]}` in `{m['function'] or '<module>'}`, {m['operator']} "
                         f"(occurrence {m['occurrence']}):  \n  `{m['line_text']}` → `{m['mutated_line']}`")
    eq = [m for m in r["mutants"] if m["status"] == "equivalent"]
    if eq:
        lines += ["", f"### Equivalent mutants in the sample ({len(eq)}, excluded from the score)", ""]
        for m in eq:
            lines.append(f"- `{m['file']}:{m['start'][0]}` {m['operator']}: `{m['line_text']}` → "
                         f"`{m['mutated_line']}` — {m['reason']}")
    other = [m for m in r["mutants"] if m["status"] in ("incompetent", "error")]
    if other:
        lines += ["", f"### Incompetent mutants ({len(other)}, excluded from the score)", ""]
        for m in other:
            lines.append(f"- `{m['file']}:{m['start'][0]}` {m['operator']}: `{m['line_text']}` → "
                         f"`{m['mutated_line']}` ({m['reason']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
