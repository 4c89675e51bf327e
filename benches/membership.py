#!/usr/bin/env python3
"""Membership benchmark: N Shoal nodes and, in the same run, N serf agents (LAN profile), all on
loopback. For each: seconds from the joins until every node lists all N alive, seconds from
`kill -9` of one node until every survivor lists it as dead (serf: failed), and gossip bytes
sent per node per second over a quiet 10 s window (iptables byte counters on the gossip ports).

    python3 benches/membership.py            # N = 10 and 30; run by hand (root), not in CI
    python3 benches/membership.py --idle 600 # 10 Shoal nodes idle for 600 s: count false dead reports

Both sides are observed by polling their own member lists, so each figure carries up to one
polling round (~0.1 s for Shoal over HTTP, more for serf, whose CLI is spawned per agent).
"""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(ROOT, "target", "release", "shoal")
DEADLINE_S = 120

def free_port(kind=socket.SOCK_DGRAM):
    s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait(cond, what):
    start = time.time()
    while time.time() - start < DEADLINE_S:
        if cond():
            return time.time()
        time.sleep(0.05)
    raise SystemExit(f"timeout: {what}")

def iptables(args):
    subprocess.run(["iptables", "-w"] + args, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def count_bytes(ports, seconds=10):
    chain = "SHOALBENCH"
    iptables(["-N", chain]); iptables(["-F", chain]); iptables(["-I", "OUTPUT", "-j", chain])
    for p in ports:
        iptables(["-A", chain, "-p", "udp", "--sport", str(p)])
    time.sleep(seconds)
    out = subprocess.run(["iptables", "-w", "-L", chain, "-v", "-x", "-n"], capture_output=True, text=True).stdout
    total = sum(int(l.split()[1]) for l in out.splitlines()[2:] if l.strip())
    iptables(["-D", "OUTPUT", "-j", chain]); iptables(["-F", chain]); iptables(["-X", chain])
    return total / len(ports) / seconds

def shoal_run(n, work, idle_s=0):
    procs, http, gossip = [], [], []
    def start(i, seeds):
        d = os.path.join(work, f"s{i}")
        os.makedirs(d, exist_ok=True)
        args = [SHOAL, "start", "--set", f"shoal.data-dir={d}", "--set", f"shoal.node.id=s{i}",
                "--set", "shoal.http.port=0", "--set", "shoal.gossip.port=0", "--set", "shoal.log-level=error",
                "--set", "shoal.cluster.seeds=[" + ",".join(f'"{s}"' for s in seeds) + "]"]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait(lambda: os.path.exists(os.path.join(d, "http.addr")), "node start")
        http.append(open(os.path.join(d, "http.addr")).read()); gossip.append(open(os.path.join(d, "gossip.addr")).read())
    start(0, [])
    for i in range(1, n):
        start(i, [gossip[0]])
    t0 = time.time()
    def members(i):
        try:
            with urllib.request.urlopen(f"http://{http[i]}/cluster/members", timeout=2) as r:
                return {m["id"]: m["state"] for m in json.load(r)["members"]}
        except Exception:
            return {}
    wait(lambda: all(list(members(i).values()).count("alive") == n for i in range(n)), "shoal convergence")
    converge = time.time() - t0
    if idle_s:
        # Every node's view, twice a second: any member not alive is a false report.
        dead, suspect, polls, end = 0, 0, 0, time.time() + idle_s
        while time.time() < end:
            for i in range(n):
                view = members(i)
                polls += 1
                dead += sum(1 for st in view.values() if st in ("dead", "left"))
                suspect += sum(1 for st in view.values() if st == "suspect")
            time.sleep(0.5)
        for p in procs:
            p.kill(); p.wait()
        return (dead, suspect), polls
    rate = count_bytes([int(g.rsplit(":", 1)[1]) for g in gossip])
    victim = n - 1
    procs[victim].send_signal(signal.SIGKILL); procs[victim].wait()
    t0 = time.time()
    wait(lambda: all(members(i).get(f"s{victim}") == "dead" for i in range(n - 1)), "shoal detection")
    detect = time.time() - t0
    for p in procs:
        p.kill(); p.wait()
    return converge, detect, rate

def serf_run(n, work):
    procs, binds, rpcs = [], [], []
    for i in range(n):
        bind, rpc = free_port(), free_port(socket.SOCK_STREAM)
        args = ["serf", "agent", f"-node=f{i}", f"-bind=127.0.0.1:{bind}", f"-rpc-addr=127.0.0.1:{rpc}", "-profile=lan",
                "-log-level=err"] + ([f"-join=127.0.0.1:{binds[0]}"] if i else [])
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        binds.append(bind); rpcs.append(rpc)
        if i == 0:
            wait(lambda: subprocess.run(["serf", "members", f"-rpc-addr=127.0.0.1:{rpc}"], capture_output=True).returncode == 0, "serf start")
    t0 = time.time()
    def members(i):
        r = subprocess.run(["serf", "members", f"-rpc-addr=127.0.0.1:{rpcs[i]}", "-format=json"], capture_output=True, text=True)
        try:
            return {m["name"]: m["status"] for m in json.loads(r.stdout)["members"]}
        except Exception:
            return {}
    wait(lambda: all(list(members(i).values()).count("alive") == n for i in range(n)), "serf convergence")
    converge = time.time() - t0
    rate = count_bytes(binds)
    victim = n - 1
    procs[victim].send_signal(signal.SIGKILL); procs[victim].wait()
    t0 = time.time()
    wait(lambda: all(members(i).get(f"f{victim}") == "failed" for i in range(n - 1)), "serf detection")
    detect = time.time() - t0
    for p in procs:
        p.kill(); p.wait()
    return converge, detect, rate

def main():
    if not os.path.exists(SHOAL):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if shutil.which("serf") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "serf"], check=True)
    if sys.argv[1:2] == ["--idle"]:
        seconds = int(sys.argv[2])
        with tempfile.TemporaryDirectory() as work:
            (dead, suspect), polls = shoal_run(10, work, idle_s=seconds)
        print(f"idle run: 10 shoal nodes, {seconds} s, {polls} member-list polls: "
              f"{dead} dead reports, {suspect} suspect observations")
        return
    sizes = [int(a) for a in sys.argv[1:]] or [10, 30]
    print(f"{'system':8} {'N':>3} {'converge s':>11} {'detect s':>9} {'gossip B/node/s':>16}")
    for n in sizes:
        rows = {}
        for name, run in (("shoal", shoal_run), ("serf", serf_run)):
            with tempfile.TemporaryDirectory() as work:
                rows[name] = run(n, work)
            c, d, b = rows[name]
            print(f"{name:8} {n:>3} {c:>11.2f} {d:>9.2f} {b:>16.0f}", flush=True)
        (sc, sd, sb), (fc, fd, fb) = rows["shoal"], rows["serf"]
        print(f"ratio shoal/serf N={n}: converge {sc / fc:.2f}, detect {sd / fd:.2f}, bytes {sb / fb:.2f}", flush=True)

main()
