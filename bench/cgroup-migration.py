#!/usr/bin/env python3
# Times moving a fresh `sleep` into a fresh v1 pids cgroup, 0.3 s apart, 15 times (docs/agent.md).
# Root only. Compare before and after `mount -o remount,[no]favordynmods <cgroup2 mount>`.
import os,time,subprocess,statistics
d='/sys/fs/cgroup/pids/ftest_mig'
os.makedirs(d,exist_ok=True)
ts=[]
for i in range(15):
    p=subprocess.Popen(['sleep','5'])
    time.sleep(0.3)
    t=time.perf_counter()
    with open(d+'/cgroup.procs','w') as f: f.write(str(p.pid))
    ts.append((time.perf_counter()-t)*1e3)
    p.kill(); p.wait()
time.sleep(0.1)
os.rmdir(d)
print('median ms',round(statistics.median(ts),3),'max',round(max(ts),2))
