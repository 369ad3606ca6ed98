#!/usr/bin/env python3
# Resident memory of a release sinew-proxy: idle, with 1,000 open client
# connections (each mid-request-head), and after one request on each.
# Run as root in a fresh netns: unshare -n python3 bench/proxy_rss.py target/release/sinew-proxy
import socket, subprocess, time, sys, os
binp = sys.argv[1]
subprocess.run(["ip","link","set","lo","up"], check=True)
srv = socket.socket(); srv.bind(("127.0.0.1", 18080)); srv.listen(10)
p = subprocess.Popen([binp, "--ingress", "127.0.0.1:15006", "--egress", "none", "--agent-socket", "none",
    "--original-dst", "127.0.0.1:18080", "--header-timeout", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
time.sleep(1.0)
idle = rss()
conns = []
for i in range(1000):
    s = socket.create_connection(("127.0.0.1", 15006)); s.sendall(b"GET / HTTP/1.1\r\nHost: w\r\n"); conns.append(s)
time.sleep(1.5)
busy = rss()
# keep-alive requests on all of them (denied without rules: 403)
for s in conns: s.sendall(b"\r\n")
for s in conns: s.recv(4096)
time.sleep(0.5)
after = rss()
print(f"idle_rss_kb={idle} rss_1000_open_kb={busy} rss_1000_after_request_kb={after}")
p.terminate(); p.wait()
