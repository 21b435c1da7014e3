#!/usr/bin/env bash
# Static checks of deploy/: no Docker daemon, no systemd, no cluster needed.
#   (a) docker-compose.yml and deploy/k8s/*.yaml parse as YAML; StatefulSets/Deployments have
#       replicas: 1 (sled locks the data directory) and a Deployment uses strategy Recreate;
#       the fwrepo compose service is not scaled;
#   (b) the files the Dockerfile COPYs and the compose file references (build context,
#       Dockerfile, bind mounts, mosquitto's acl) exist and are not excluded by .dockerignore;
#   (c) systemd-analyze verify of the unit (when installed) plus a section/ExecStart check;
#   (e) cluster mode (deploy/cluster/, deploy/k8s-cluster/): every replica shares the
#       catalog (PostgreSQL), the blob store (S3), the broker (external, one share group) and
#       the URL signing key; compose replicas have distinct ids and nginx balances over all
#       of them; the files they mount exist (the signing key is the operator's);
#   (d) every FWREPO_* variable named under deploy/ is a flag of README.md's Configuration
#       table (FWREPO_FOO_BAR <-> --foo-bar); TOML keys in deploy/fwrepo.toml and the k8s
#       ConfigMap are flag names; deploy/fwrepo.toml lists every flag.
# Prints one line per check (ok / FAIL / SKIP / NOTE); exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
failed=0
ok() { printf 'ok    %s\n' "$*"; }
fail() {
  printf 'FAIL  %s\n' "$*"
  failed=1
}
skip() { printf 'SKIP %s\n' "$*"; }

# Runs a Python check; its stdout lines are already in the ok/FAIL/SKIP/NOTE format, and a
# non-zero exit marks the whole run failed.
# Every Python check starts with `say` (prints a status line; a FAIL sets `bad`) and ends
# with sys.exit(1 if bad else 0).
PY_PRELUDE='bad = False
def say(status, msg):
    global bad
    print(f"{status} {msg}" if status == "SKIP" else f"{status:<5} {msg}")
    bad |= status == "FAIL"
'
pycheck() {
  if ! { printf '%s\n' "$PY_PRELUDE"; cat; } | "$PY" - "$@"; then
    failed=1
  fi
}

if ! command -v "$PY" >/dev/null; then
  fail "python3 not found: every check below needs it"
  exit 1
fi

# ---- (a) YAML ---------------------------------------------------------------------------------
have_yaml=1
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  if ! "$PY" -m pip install -q pyyaml >/dev/null 2>&1 || ! "$PY" -c 'import yaml' 2>/dev/null; then
    have_yaml=0
  fi
fi
if [ "$have_yaml" = 1 ]; then
  pycheck <<'PY'
import glob, sys, yaml

files = ["deploy/docker-compose.yml"] + sorted(glob.glob("deploy/k8s/*.yaml") + glob.glob("deploy/k8s/*.yml"))
if len(files) == 1:
    say("FAIL", "yaml: no deploy/k8s/*.yaml")
for f in files:
    try:
        with open(f) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        say("FAIL", f"yaml: {f}: {e}")
        continue
    say("ok", f"yaml: {f} ({len(docs)} document{'s' if len(docs) != 1 else ''})")
    if f.endswith("docker-compose.yml"):
        svc = (docs[0] or {}).get("services", {}).get("fwrepo") if docs else None
        if not svc:
            say("FAIL", f"compose: {f} has no fwrepo service")
        else:
            replicas = (svc.get("deploy") or {}).get("replicas", 1)
            scale = svc.get("scale", 1)
            if replicas != 1 or scale != 1:
                say("FAIL", f"compose: fwrepo is scaled (replicas {replicas}, scale {scale}); sled allows one instance")
            else:
                say("ok", "compose: one fwrepo container")
        continue
    for d in docs:
        kind = d.get("kind")
        name = (d.get("metadata") or {}).get("name", "?")
        if kind in ("StatefulSet", "Deployment"):
            spec = d.get("spec") or {}
            r = spec.get("replicas")
            if r != 1:
                say("FAIL", f"k8s: {f}: {kind}/{name} replicas is {r!r}, must be 1 (sled locks the data dir)")
            else:
                say("ok", f"k8s: {kind}/{name} replicas 1")
            if kind == "Deployment" and (spec.get("strategy") or {}).get("type") != "Recreate":
                say("FAIL", f"k8s: {f}: Deployment/{name} needs strategy Recreate (a rolling update starts a second pod on the locked volume)")
        if kind == "HorizontalPodAutoscaler":
            say("FAIL", f"k8s: {f}: HorizontalPodAutoscaler/{name}: fwrepo runs one replica")
sys.exit(1 if bad else 0)
PY
else
  skip "yaml: PyYAML missing and 'python3 -m pip install pyyaml' failed; compose and k8s files not parsed"
fi

# ---- (b) referenced files -----------------------------------------------------------------------
pycheck "$have_yaml" <<'PY'
import fnmatch, glob, json, os, re, shlex, sys
have_yaml = sys.argv[1] == "1"

# .dockerignore of the build context (the repository root), with ! exceptions.
ignore = []
if os.path.exists(".dockerignore"):
    for line in open(".dockerignore"):
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            pat = line.lstrip("!").strip("/")
            ignore.append((neg, pat))
def ignored(path):
    path = os.path.normpath(path).lstrip("./") or "."
    parts = path.split("/")
    hit = False
    for neg, pat in ignore:
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:i]), pat):
                hit = not neg
                break
    return hit

# Dockerfile: COPY/ADD sources (not --from=stage) relative to the context.
df = "deploy/Dockerfile"
context = "."
if not os.path.exists(df):
    say("FAIL", f"dockerfile: {df} missing")
else:
    text = re.sub(r"\\\n", " ", open(df).read())
    stages, n = set(), 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            if m:
                stages.add(m.group(1).lower())
        if word not in ("COPY", "ADD"):
            continue
        rest = rest.strip()
        args = [a for a in shlex.split(rest)] if not rest.startswith("[") else None
        opts = [a for a in (args or []) if a.startswith("--")]
        frm = [o.split("=", 1)[1] for o in opts if o.startswith("--from=")]
        if frm:
            if frm[0].lower() not in stages:
                say("FAIL", f"dockerfile: {word} --from={frm[0]}: no such stage")
            continue
        srcs = (json.loads(rest) if args is None else [a for a in args if not a.startswith("--")])[:-1]
        for s in srcs:
            p = os.path.join(context, s)
            n += 1
            if not glob.glob(p):
                say("FAIL", f"dockerfile: {word} source {s} does not exist in the build context")
            elif ignored(s):
                say("FAIL", f"dockerfile: {word} source {s} is excluded by .dockerignore")
    if n:
        say("ok", f"dockerfile: {n} COPY sources exist in the build context and pass .dockerignore")
    for need, why in (("USER", "non-root user"), ("HEALTHCHECK", "health check"), ("ENTRYPOINT", "entrypoint")):
        if not re.search(rf"^\s*{need}\b", text, re.M):
            say("FAIL", f"dockerfile: no {need} ({why})")
    if re.search(r"^\s*USER\s+(0|root)\b", text, re.M | re.I):
        say("FAIL", "dockerfile: runs as root")

# Compose: build context/dockerfile, bind mounts, env_file.
cf = "deploy/docker-compose.yml"
base = os.path.dirname(cf)
refs = []  # (what, host path, container path or None)
if have_yaml:
    import yaml
    try:
        data = yaml.safe_load(open(cf)) or {}
    except Exception as e:  # reported by (a)
        data = {}
    for name, svc in (data.get("services") or {}).items():
        b = svc.get("build")
        if isinstance(b, str):
            b = {"context": b}
        if b:
            ctx = os.path.normpath(os.path.join(base, b.get("context", ".")))
            refs.append((f"{name}: build context", ctx, None))
            refs.append((f"{name}: dockerfile", os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))), None))
        for v in svc.get("volumes") or []:
            if isinstance(v, dict):
                src, dst = (v.get("source"), v.get("target")) if v.get("type") == "bind" else (None, None)
            else:
                src, _, dst = v.partition(":")
                dst = dst.split(":")[0]
            if src and src.startswith((".", "/", "~")):
                refs.append((f"{name}: bind mount", os.path.normpath(os.path.join(base, src)), dst))
        ef = svc.get("env_file")
        for e in ([ef] if isinstance(ef, str) else ef or []):
            e = e if isinstance(e, str) else e.get("path")
            refs.append((f"{name}: env_file", os.path.normpath(os.path.join(base, e)), None))
else:
    # Without PyYAML: the obvious line forms.
    for line in open(cf):
        m = re.match(r"\s*context:\s*(\S+)", line)
        if m:
            ctx = os.path.normpath(os.path.join(base, m.group(1)))
            refs.append(("build context", ctx, None))
        m = re.match(r"\s*dockerfile:\s*(\S+)", line)
        if m:
            refs.append(("dockerfile", os.path.normpath(os.path.join(ctx, m.group(1))), None))
        m = re.match(r"\s*-\s*\"?(\.{1,2}/[^:\"]*):([^:\"]+)", line)
        if m:
            refs.append(("bind mount", os.path.normpath(os.path.join(base, m.group(1))), m.group(2)))
    say("NOTE", "compose: references read with regexes (no PyYAML)")
mounts = {}
for what, path, dst in refs:
    if os.path.exists(path):
        say("ok", f"compose: {what} {path}")
        if dst:
            mounts[dst.rstrip("/")] = path
    else:
        say("FAIL", f"compose: {what} {path} does not exist")

# Files mosquitto.conf names inside a mounted directory: acl must exist; passwd is the
# operator's (not in git).
conf_dir = mounts.get("/mosquitto/config")
if conf_dir:
    conf = os.path.join(conf_dir, "mosquitto.conf")
    if not os.path.exists(conf):
        say("FAIL", f"mosquitto: {conf} missing (the image reads /mosquitto/config/mosquitto.conf)")
    else:
        for line in open(conf):
            m = re.match(r"\s*(password_file|acl_file)\s+(\S+)", line)
            if not m:
                continue
            key, target = m.groups()
            if not target.startswith("/mosquitto/config/"):
                say("FAIL", f"mosquitto: {key} {target} is outside the mounted /mosquitto/config")
                continue
            host = os.path.join(conf_dir, target[len("/mosquitto/config/"):])
            if os.path.exists(host):
                say("ok", f"mosquitto: {key} {host}")
            elif key == "password_file":
                say("NOTE", f"mosquitto: {host} not present (operator-created: deploy/mosquitto/README.md)")
            else:
                say("FAIL", f"mosquitto: {key} {host} does not exist")
    acl = os.path.join(conf_dir, "acl")
    if os.path.exists(acl):
        errs = []
        for i, line in enumerate(open(acl), 1):
            w = line.split()
            if not w or w[0].startswith("#"):
                continue
            if w[0] == "user" and len(w) == 2:
                continue
            if w[0] in ("topic", "pattern"):
                if len(w) == 2 or (len(w) == 3 and w[1] in ("read", "write", "readwrite", "deny")):
                    continue
            errs.append(f"line {i}: {line.strip()}")
        if errs:
            say("FAIL", f"mosquitto: {acl}: not an ACL line: " + "; ".join(errs))
        else:
            say("ok", f"mosquitto: {acl} syntax")
sys.exit(1 if bad else 0)
PY

# ---- (c) systemd unit ---------------------------------------------------------------------------
unit=deploy/systemd/fwrepo.service
if [ ! -f "$unit" ]; then
  fail "systemd: $unit missing"
else
  if command -v systemd-analyze >/dev/null; then
    # verify insists that ExecStart's binary exists; point it at a stub so that only the
    # unit itself is judged. It exits 0 on unknown keys or bad values, so any line about
    # the unit counts as a failure.
    tmp=$(mktemp -d)
    printf '#!/bin/sh\nexit 0\n' >"$tmp/fwrepo"
    chmod +x "$tmp/fwrepo"
    sed "s#/usr/local/bin/fwrepo#$tmp/fwrepo#g" "$unit" >"$tmp/fwrepo.service"
    out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$tmp/fwrepo.service" 2>&1)
    rc=$?
    problems=$(printf '%s\n' "$out" | grep -E 'fwrepo\.service(:[0-9]+)?:' || true)
    if [ $rc -ne 0 ] || [ -n "$problems" ]; then
      fail "systemd-analyze verify $unit (rc $rc):"
      printf '%s\n' "$out" | sed "s#$tmp/#deploy/systemd/#g; s/^/      /"
    else
      ok "systemd-analyze verify $unit (ExecStart binary stubbed)"
    fi
    rm -rf "$tmp"
  else
    skip "systemd-analyze: not installed"
  fi
  pycheck "$unit" <<'PY'
import re, sys
unit = sys.argv[1]
sections, keys, bad = set(), {}, False
section = None
for line in open(unit):
    line = line.strip()
    if not line or line.startswith(("#", ";")):
        continue
    m = re.fullmatch(r"\[(\w+)\]", line)
    if m:
        section = m.group(1)
        sections.add(section)
        continue
    k, sep, v = line.partition("=")
    if not sep or section is None:
        print(f"FAIL  systemd: {unit}: not a key=value line: {line}")
        bad = True
        continue
    keys.setdefault((section, k.strip()), v.strip())
for s in ("Unit", "Service", "Install"):
    if s not in sections:
        print(f"FAIL  systemd: {unit}: no [{s}] section")
        bad = True
exec_start = keys.get(("Service", "ExecStart"), "")
if not exec_start.startswith("/"):
    print(f"FAIL  systemd: {unit}: no ExecStart with an absolute path")
    bad = True
try:
    stop = int(keys.get(("Service", "TimeoutStopSec"), "90").rstrip("s"))
except ValueError:
    stop = 0
m = re.search(r"--shutdown-grace[ =](\d+)", exec_start)
grace = int(m.group(1)) if m else 20
if stop <= grace:
    print(f"FAIL  systemd: TimeoutStopSec {stop} must exceed the shutdown grace {grace}")
    bad = True
if not bad:
    print(f"ok    systemd: {unit}: [Unit] [Service] [Install], ExecStart, TimeoutStopSec {stop} > grace {grace}")
sys.exit(1 if bad else 0)
PY
fi

# ---- (e) cluster mode ---------------------------------------------------------------------------
if [ "$have_yaml" = 1 ]; then
  pycheck <<'PY'
import glob, os, re, sys, yaml

need = {
    "FWREPO_CATALOG": lambda v: v.startswith(("postgres://", "postgresql://")),
    "FWREPO_BLOB_STORE": lambda v: v.startswith("s3://"),
    "FWREPO_MQTT_URL": lambda v: v.startswith(("mqtt://", "mqtts://")),
    "FWREPO_URL_SIGNING_KEY_FILE": lambda v: bool(v),
}
cf = "deploy/cluster/docker-compose.yml"
if not os.path.exists(cf):
    say("FAIL", f"cluster: {cf} missing")
    sys.exit(1)
data = yaml.safe_load(open(cf)) or {}
services = data.get("services") or {}
replicas = {n: s for n, s in services.items() if re.fullmatch(r"fwrepo-\d+", n)}
if len(replicas) < 2:
    say("FAIL", f"cluster: {cf} has {len(replicas)} fwrepo-N services; several replicas expected")
ids, groups = set(), set()
for name, svc in sorted(replicas.items()):
    env = svc.get("environment") or {}
    missing = [k for k, ok in need.items() if not ok(str(env.get(k, "")))]
    if missing:
        say("FAIL", f"cluster: {name} lacks a shared {', '.join(missing)}")
    ids.add(env.get("FWREPO_REPLICA_ID"))
    groups.add(env.get("FWREPO_MQTT_SHARE_GROUP", "fwrepo"))
    if (svc.get("deploy") or {}).get("replicas", 1) != 1:
        say("FAIL", f"cluster: {name} is scaled: give each replica its own id and volume")
if None in ids or len(ids) != len(replicas):
    say("FAIL", f"cluster: replica ids not distinct: {sorted(map(str, ids))}")
elif len(groups) != 1:
    say("FAIL", f"cluster: replicas in different share groups: {sorted(groups)}")
else:
    say("ok", f"cluster: {len(replicas)} replicas share catalog, blobs, broker and signing key; ids distinct")
base = os.path.dirname(cf)
for name, svc in services.items():
    for v in svc.get("volumes") or []:
        src = v.split(":")[0] if isinstance(v, str) else None
        if src and src.startswith("."):
            path = os.path.normpath(os.path.join(base, src))
            say("ok" if os.path.exists(path) else "FAIL", f"cluster: {name}: bind mount {path}")
for name, sec in (data.get("secrets") or {}).items():
    path = os.path.normpath(os.path.join(base, sec.get("file", "")))
    if not os.path.exists(path):
        say("NOTE", f"cluster: secret {name}: {path} not present (operator-created: openssl rand -hex 32)")
conf = os.path.join(base, "nginx.conf")
if os.path.exists(conf):
    text = open(conf).read()
    upstream = set(re.findall(r"^\s*server\s+([\w-]+):8080", text, re.M))
    if upstream != set(replicas):
        say("FAIL", f"cluster: nginx upstream {sorted(upstream)} is not the replicas {sorted(replicas)}")
    else:
        say("ok", f"cluster: nginx balances over {len(upstream)} replicas")
    for directive in ("proxy_buffering off", "proxy_request_buffering off", "client_max_body_size 0"):
        if directive not in text:
            say("FAIL", f"cluster: nginx.conf lacks '{directive}' (downloads and uploads are streamed)")
else:
    say("FAIL", f"cluster: {conf} missing")

for f in sorted(glob.glob("deploy/k8s-cluster/*.y*ml")):
    docs = [d for d in yaml.safe_load_all(open(f)) if d]
    say("ok", f"yaml: {f} ({len(docs)} documents)")
    toml = "".join(
        body for d in docs if d.get("kind") == "ConfigMap" for body in (d.get("data") or {}).values()
    )
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        spec = d.get("spec") or {}
        name = (d.get("metadata") or {}).get("name")
        if (spec.get("replicas") or 1) < 2:
            say("FAIL", f"k8s-cluster: Deployment/{name} has fewer than 2 replicas")
        c = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        env = {e.get("name") for e in c[0].get("env") or []}
        have = {
            "catalog": "FWREPO_CATALOG" in env or re.search(r"^\s*catalog\s*=", toml, re.M),
            "s3 blob store": re.search(r'^\s*blob_store\s*=\s*"s3://', toml, re.M),
            "external broker": re.search(r"^\s*mqtt_url\s*=", toml, re.M),
            "shared signing key": re.search(r"^\s*url_signing_key_file\s*=", toml, re.M),
            "replica id": "FWREPO_REPLICA_ID" in env,
        }
        lacking = [k for k, v in have.items() if not v]
        if lacking:
            say("FAIL", f"k8s-cluster: Deployment/{name} lacks {', '.join(lacking)}")
        else:
            say("ok", f"k8s-cluster: Deployment/{name} replicas {spec.get('replicas')} on shared catalog, blobs, broker and key")
sys.exit(1 if bad else 0)
PY
else
  skip "cluster: PyYAML missing"
fi

# ---- (d) FWREPO_* variables and TOML keys against README's Configuration table --------------
pycheck "$have_yaml" <<'PY'
import glob, os, re, sys
have_yaml = sys.argv[1] == "1"

readme = open("README.md").read()
m = re.search(r"^## Configuration\n(.*?)(?=^##? )", readme, re.M | re.S)
if not m:
    say("FAIL", "config: README.md has no '## Configuration' section")
    sys.exit(1)
flags = set()
for line in m.group(1).splitlines():
    if line.startswith("|"):
        cell = line.split("|")[1]
        flags.update(re.findall(r"`--([a-z0-9][a-z0-9-]*)", cell))
if len(flags) < 10:
    say("FAIL", f"config: only {len(flags)} flags found in README's Configuration table")
    sys.exit(1)
reserved = lambda v: v in ("FWREPO_TOKEN", "FWREPO_SERVER") or v.startswith("FWREPO_TEST_")

seen = {}
for path in sorted(glob.glob("deploy/**/*", recursive=True)):
    if not os.path.isfile(path):
        continue
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        continue
    for var in re.findall(r"\bFWREPO_[A-Z0-9_]*[A-Z0-9]", text):
        seen.setdefault(var, set()).add(path)
unknown = {v: p for v, p in seen.items() if not reserved(v) and v[len("FWREPO_"):].lower().replace("_", "-") not in flags}
for v, paths in sorted(unknown.items()):
    say("FAIL", f"config: {v} ({', '.join(sorted(paths))}) is no flag of README's Configuration table (--{v[7:].lower().replace('_', '-')})")
if not unknown:
    say("ok", f"config: {len(seen)} FWREPO_* variables under deploy/ all map to documented flags")

keys = {f.replace("-", "_") for f in flags} - {"config"}
keys.add("models")

# deploy/fwrepo.toml: keys, commented or not, outside [models].
sample = "deploy/fwrepo.toml"
found, in_models = set(), False
for line in open(sample):
    s = line.strip().lstrip("#").strip()
    if s.startswith("["):
        in_models = s == "[models]"
        if in_models:
            found.add("models")
        continue
    km = re.match(r"([a-z][a-z0-9_]*)\s*=", s)
    if km and not in_models:
        found.add(km.group(1))
extra = found - keys
missing = keys - found
if extra:
    say("FAIL", f"config: {sample} has keys that are no documented flag: {', '.join(sorted(extra))}")
if missing:
    say("FAIL", f"config: {sample} lacks documented settings: {', '.join(sorted(missing))}")
if not extra and not missing:
    say("ok", f"config: {sample} lists every documented setting ({len(found)}) and nothing else")
try:
    import tomllib
except ImportError:
    tomllib = None
if tomllib:
    try:
        tomllib.load(open(sample, "rb"))
    except tomllib.TOMLDecodeError as e:
        say("FAIL", f"config: {sample}: {e}")

# TOML files inside k8s ConfigMaps.
if not have_yaml or tomllib is None:
    say("SKIP", "config: k8s ConfigMap TOML not checked (needs PyYAML and Python 3.11 tomllib)")
else:
    import yaml
    for f in sorted(glob.glob("deploy/k8s/*.y*ml") + glob.glob("deploy/k8s-cluster/*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(open(f)))
        except yaml.YAMLError:
            continue  # reported by (a)
        for d in docs:
            if not d or d.get("kind") != "ConfigMap":
                continue
            for name, body in (d.get("data") or {}).items():
                if not name.endswith(".toml"):
                    continue
                try:
                    t = tomllib.loads(body)
                except tomllib.TOMLDecodeError as e:
                    say("FAIL", f"config: {f}: ConfigMap {name}: {e}")
                    continue
                extra = set(t) - keys
                if extra:
                    say("FAIL", f"config: {f}: ConfigMap {name}: unknown keys {', '.join(sorted(extra))} (fwrepo refuses unknown keys)")
                else:
                    say("ok", f"config: {f}: ConfigMap {name} parses, keys {', '.join(sorted(t))}")
sys.exit(1 if bad else 0)
PY

# ---- (e) ------------------------------------------------------------------------------------
echo "docker image not built: no daemon on CI machines"
if [ "$failed" -ne 0 ]; then
  echo "check_deploy: FAILED"
  exit 1
fi
echo "check_deploy: all checks passed"
