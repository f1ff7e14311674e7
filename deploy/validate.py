"""Consistency checks of the deployment files that no schema makes.

Run by deploy/validate.sh (with PyYAML from its venv); exits non-zero and
lists every problem found. Offline: reads only files of the repository.
"""

import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
problems: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


def rust_const(path: str, name: str, pattern: str) -> int | None:
    """An integer constant of the Rust sources (None if it moved: warn)."""
    text = (ROOT / path).read_text()
    m = re.search(rf"const {name}:[^=]*=\s*{pattern}", text)
    if not m:
        print(f"warning: {name} not found in {path}; check skipped", file=sys.stderr)
        return None
    return int(m.group(1))


HTTP_PORT = rust_const("crates/switchboard/src/config/mod.rs", "DEFAULT_HTTP_PORT", r"(\d+)")
MEDIA_PORT = rust_const("crates/switchboard/src/config/mod.rs", "DEFAULT_MEDIA_PORT", r"(\d+)")
TRUNK_PORT = rust_const("crates/switchboard/src/config/mod.rs", "DEFAULT_TRUNK_PORT", r"(\d+)")
DRAIN_LIMIT = rust_const(
    "crates/switchboard/src/lib.rs", "DRAIN_LIMIT", r"Duration::from_secs\((\d+)\)"
)
TRUNK_GRACE = rust_const(
    "crates/trunk/src/quic/driver.rs", "SHUTDOWN_GRACE", r"Duration::from_secs\((\d+)\)"
)


# ---- Dockerfile ---------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def readme_cargo_commands() -> list[list[str]]:
    cmds, fenced = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        s = line.split(" #")[0].strip()
        if fenced and s.startswith("cargo "):
            cmds.append(shlex.split(s))
    return cmds


def dockerignore_ignores(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, and a
    pattern matching a directory excludes what is below it."""

    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        if any(regex(pat).match(p) for p in prefixes):
            ignored = not neg
    return ignored


def check_dockerfile() -> None:
    ins = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    froms = [(i, a) for i, (w, a) in enumerate(ins) if w == "FROM"]
    check(len(froms) == 2, "Dockerfile: expected two stages (builder, runtime)")
    if len(froms) == 2:
        check(re.fullmatch(r"rust:1-bookworm AS \w+", froms[0][1], re.I) is not None,
              f"Dockerfile: builder must be `rust:1-bookworm AS <name>`, is `{froms[0][1]}`")
        check(froms[1][1] == "debian:bookworm-slim",
              f"Dockerfile: runtime must be debian:bookworm-slim, is `{froms[1][1]}`")
    stages = {a.split()[-1] for _, a in froms if " AS " in a.upper()}
    final = ins[froms[-1][0]:] if froms else []

    # Every cargo command is the README's (or the README's with fewer -p).
    readme = readme_cargo_commands()
    cargo_cmds = []
    for w, a in ins:
        if w != "RUN":
            continue
        body = re.sub(r"^(--\S+\s+)+", "", a)
        for seg in re.split(r"&&|\|\||;", body):
            toks = shlex.split(seg)
            if toks and toks[0] == "cargo":
                cargo_cmds.append(toks)
    check(any(t[:2] == ["cargo", "build"] for t in cargo_cmds),
          "Dockerfile: no `cargo build` step")
    for toks in cargo_cmds:
        match = [r for r in readme if r[: len(toks)] == toks and
                 all(x.startswith("-p") or x.startswith("switchboard") for x in r[len(toks):])]
        check(bool(match), f"Dockerfile: `{' '.join(toks)}` is not a README command "
                           f"(README has: {[' '.join(r) for r in readme if r[:2] == toks[:2]]})")
        if match:
            print(f"   Dockerfile `{' '.join(toks)}` = README `{' '.join(match[0])}`"
                  + ("" if match[0] == toks else " (the node only)"))

    for w, a in ins:
        if w == "COPY" and "--from=" in a:
            src = re.search(r"--from=(\S+)", a).group(1)
            check(src in stages, f"Dockerfile: COPY --from={src}: no such stage")
        if w == "RUN" and "apt-get install" in a:
            check("--no-install-recommends" in a and "rm -rf /var/lib/apt/lists" in a,
                  "Dockerfile: apt-get install without --no-install-recommends / list cleanup")
    users = [a for w, a in final if w == "USER"]
    check(bool(users) and re.fullmatch(r"\d+(:\d+)?", users[-1]) is not None
          and int(users[-1].split(":")[0]) != 0,
          "Dockerfile: the runtime stage must end as a numeric non-root USER")
    hc = [a for w, a in final if w == "HEALTHCHECK"]
    check(len(hc) == 1 and "/healthz" in hc[0], "Dockerfile: HEALTHCHECK on /healthz missing")
    check(any(w == "ENTRYPOINT" for w, _ in final), "Dockerfile: no ENTRYPOINT")
    exposed = {p for w, a in final if w == "EXPOSE" for p in a.split()}
    want = {f"{HTTP_PORT}/tcp", f"{MEDIA_PORT}/udp", f"{MEDIA_PORT}/tcp", f"{TRUNK_PORT}/udp"}
    check(exposed == want, f"Dockerfile: EXPOSE {sorted(exposed)}, want {sorted(want)}")

    # The build context keeps what `cargo build` reads.
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.strip().startswith("#")]
    ws = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    needed = ["Cargo.toml", "Cargo.lock", "web/index.html", "crates/switchboard/build.rs"]
    for member in ws["members"]:
        needed += [f"{member}/Cargo.toml", f"{member}/src"]
    for path in needed:
        check((ROOT / path).exists(), f".dockerignore check: {path} does not exist")
        check(not dockerignore_ignores(ignore, path), f".dockerignore: excludes {path}, "
                                                      "which the build needs")
    for path in ["target/release/switchboard", ".git/HEAD", "e2e/node_modules/x"]:
        check(dockerignore_ignores(ignore, path), f".dockerignore: should exclude {path}")


# ---- compose ----------------------------------------------------------------

def check_compose() -> None:
    doc = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = doc.get("services", {})
    check(len(services) == 3, f"compose: {len(services)} services, want 3")
    ids, trunk, edges = {}, {}, set()
    for name, svc in services.items():
        env = svc.get("environment", {})
        check(isinstance(env, dict), f"compose {name}: environment must be a mapping")
        node_id = env.get("SWITCHBOARD_NODE_ID")
        check(node_id not in ids.values(), f"compose {name}: node id {node_id} used twice")
        ids[name] = node_id
        trunk[name] = env.get("SWITCHBOARD_TRUNK_PORT", str(TRUNK_PORT))
        check(env.get("SWITCHBOARD_BIND") == "0.0.0.0", f"compose {name}: bind 0.0.0.0")
        check("SWITCHBOARD_PUBLIC_IP" in env, f"compose {name}: no SWITCHBOARD_PUBLIC_IP")
        ports = set(svc.get("ports", []))
        media = env.get("SWITCHBOARD_MEDIA_PORT", str(MEDIA_PORT))
        http = env.get("SWITCHBOARD_HTTP_PORT", str(HTTP_PORT))
        # ICE advertises the port the node listens on: published == container.
        for want in (f"{media}:{media}/udp", f"{media}:{media}/tcp", f"{http}:{http}/tcp"):
            check(want in ports, f"compose {name}: port {want} not published")
        check("healthcheck" in svc and "readyz" in str(svc["healthcheck"]["test"]),
              f"compose {name}: no /readyz health check")
        check(svc.get("env_file") == "secrets.env", f"compose {name}: env_file secrets.env")
        grace = int(str(svc.get("stop_grace_period", "10s")).rstrip("s"))
        check(grace >= 20, f"compose {name}: stop_grace_period {grace}s < 20s (drain)")
        check(svc.get("read_only") is True, f"compose {name}: read_only root fs")
    for name, svc in services.items():
        peers = svc.get("environment", {}).get("SWITCHBOARD_PEERS", "")
        for peer in filter(None, peers.split(",")):
            m = re.fullmatch(r"(\d+)@([\w.-]+):(\d+)", peer)
            check(m is not None, f"compose {name}: bad peer {peer!r}")
            if not m:
                continue
            pid, host, port = m.groups()
            check(host in services, f"compose {name}: peer host {host} is no service")
            if host in services:
                check(ids[host] == pid, f"compose {name}: peer {peer} but {host} is node {ids[host]}")
                check(trunk[host] == port, f"compose {name}: peer {peer} but {host}'s trunk "
                                           f"port is {trunk[host]}")
                dep = svc.get("depends_on", {})
                check(host in dep, f"compose {name}: peer {host} not in depends_on "
                                   "(a --peer name resolves once at start)")
                edges.add(frozenset((name, host)))
    names = list(services)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            check(frozenset((a, b)) in edges, f"compose: no trunk between {a} and {b}")
    check((ROOT / "deploy" / doc["x-switchboard"]["build"]["context"] / "Dockerfile").exists(),
          "compose: build context has no Dockerfile")


# ---- Kubernetes ---------------------------------------------------------------

def check_k8s() -> None:
    docs = [d for f in sorted((ROOT / "deploy/k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind: dict[str, list] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (sts,) = by_kind["StatefulSet"]
    ns = sts["metadata"]["namespace"]
    for d in docs:
        if d["kind"] != "Namespace":
            check(d["metadata"].get("namespace") == ns,
                  f"k8s {d['kind']}/{d['metadata']['name']}: namespace is not {ns}")
    svcs = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    head = svcs.get(sts["spec"]["serviceName"])
    check(head is not None, "k8s: the StatefulSet's serviceName is no Service")
    pod = sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for s in svcs.values():
        sel = s["spec"].get("selector", {})
        check(sel and all(labels.get(k) == v for k, v in sel.items()),
              f"k8s Service/{s['metadata']['name']}: selector does not select the pods")
    if head:
        check(head["spec"].get("clusterIP") == "None", "k8s: discovery Service is not headless")
        check(head["spec"].get("publishNotReadyAddresses") is True,
              "k8s: discovery Service needs publishNotReadyAddresses: true")
        check({(p["port"], p["protocol"]) for p in head["spec"]["ports"]} == {(TRUNK_PORT, "UDP")},
              f"k8s: discovery Service must carry the trunk port {TRUNK_PORT}/UDP")
        dns = f"{head['metadata']['name']}.{ns}.svc.cluster.local:{TRUNK_PORT}"
    (c,) = pod["containers"]
    args = c.get("args", [])
    check(args[args.index("--bind") + 1] == "0.0.0.0" if "--bind" in args else False,
          "k8s: --bind 0.0.0.0 missing")
    if head:
        check("--peer-dns" in args and args[args.index("--peer-dns") + 1] == dns,
              f"k8s: --peer-dns {dns} missing")
    env = {e["name"]: e for e in c.get("env", [])}
    for want in ("SWITCHBOARD_NODE_ID", "SWITCHBOARD_PUBLIC_IP", "SWITCHBOARD_CLUSTER_SECRET",
                 "SWITCHBOARD_AUTH_SECRET"):
        check(want in env, f"k8s: env {want} missing")
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            s = secrets.get(ref["name"])
            keys = set((s or {}).get("stringData", {})) | set((s or {}).get("data", {}))
            check(ref["key"] in keys, f"k8s: env {e['name']} reads {ref['name']}/{ref['key']}, "
                                      "which the Secret template lacks")
    ports = {(p["containerPort"], p["protocol"]) for p in c["ports"]}
    want = {(HTTP_PORT, "TCP"), (MEDIA_PORT, "UDP"), (MEDIA_PORT, "TCP"), (TRUNK_PORT, "UDP")}
    check(ports == want, f"k8s: container ports {sorted(ports)}, want {sorted(want)}")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "k8s: readiness not on /readyz")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "k8s: liveness not on /healthz")
    check(pod.get("enableServiceLinks") is False,
          "k8s: enableServiceLinks must be false (service env vars collide with SWITCHBOARD_*)")
    sc = c.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False,
          "k8s: container securityContext: read-only root fs, no privilege escalation")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, "k8s: runAsNonRoot")
    check("limits" in c.get("resources", {}) and "requests" in c["resources"], "k8s: resources")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_s = int(pre[1]) if pre[:1] == ["sleep"] else 0
    if DRAIN_LIMIT is not None and TRUNK_GRACE is not None:
        need = pre_s + 2 * TRUNK_GRACE + 2 * DRAIN_LIMIT
        grace = pod.get("terminationGracePeriodSeconds", 30)
        check(grace >= need + 5, f"k8s: terminationGracePeriodSeconds {grace} < drain bound "
                                 f"{need} s + 5 s margin")
    check(sts["spec"]["replicas"] == 3, "k8s: 3 replicas")


check_dockerfile()
check_compose()
check_k8s()
if problems:
    print(f"{len(problems)} problem(s):", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
print("   Dockerfile, compose.yaml and k8s/ are consistent")
