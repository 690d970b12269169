"""Lines up the bench's slow requests with a scheduler trace of the same run (scripts/tails).

tails.py SLOW SCHED PROXY
  SLOW   lines "start_ns elapsed_ns connection" (CLOCK_MONOTONIC), '#' lines ignored
  SCHED  `perf script -F comm,tid,cpu,time,event,trace --ns` of sched_switch and sched_waking
  PROXY  the start of the proxy's thread names (berth, haproxy), for its on-CPU figures
"""
import bisect
import collections
import re
import sys

EVENT = re.compile(r'\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+(\d+)\.(\d+):\s+sched:(\w+):\s+(.*)')
SWITCH = re.compile(r'prev_comm=(.+?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)')
WAKING = re.compile(r'comm=(.+?) pid=(\d+) .*target_cpu=(\d+)')
BIG_DELAY_NS = 100_000


def family(name):
    """A thread's name without its instance number: berth-worker-0 → berth-worker, kworker/0:2 → kworker."""
    name = re.sub(r'-\d+$', '', name)
    return re.sub(r'/.*$', '', name)


def load(slow_path, sched_path):
    slow = [tuple(map(int, line.split())) for line in open(slow_path) if line.strip() and not line.startswith('#')]
    events = []
    for line in open(sched_path, errors='replace'):
        m = EVENT.match(line)
        if m:
            comm, _, cpu, sec, frac, kind, rest = m.groups()
            events.append((int(sec) * 1_000_000_000 + int(frac.ljust(9, '0')[:9]), int(cpu), kind, rest))
    events.sort()
    return slow, events


def analyse(slow, events, proxy):
    # Wake-up delays: a task's sched_waking to the switch that runs it; and on-CPU stretches.
    waking, delays, since, stretches = {}, [], {}, collections.defaultdict(list)
    running = {}
    for t, cpu, kind, rest in events:
        if kind == 'sched_waking':
            m = WAKING.search(rest)
            if m and int(m.group(2)) not in waking:
                waking[int(m.group(2))] = (t, m.group(1), int(m.group(3)))
        elif kind == 'sched_switch':
            m = SWITCH.search(rest)
            if not m:
                continue
            prev, nxt, nxt_pid = m.group(1), m.group(4), int(m.group(5))
            # A stretch counts only when the trace saw it start (some switches go unrecorded).
            if cpu in since and since[cpu][1] == prev:
                stretches[family(prev)].append(t - since[cpu][0])
            since[cpu] = (t, nxt)
            running.setdefault(cpu, []).append((t, family(nxt)))
            if nxt_pid in waking:
                w, name, _ = waking.pop(nxt_pid)
                delays.append((w, t - w, family(name), cpu))
    starts = [d[0] for d in delays]
    switch_times = {cpu: [s[0] for s in seq] for cpu, seq in running.items()}

    def holder(cpu, a, b):
        """The task that held `cpu` longest in [a, b]."""
        seq, times = running.get(cpu, []), switch_times.get(cpu, [])
        i = max(bisect.bisect_right(times, a) - 1, 0)
        held = collections.Counter()
        while i < len(seq) and seq[i][0] < b:
            end = seq[i + 1][0] if i + 1 < len(seq) else b
            held[seq[i][1]] += min(end, b) - max(seq[i][0], a)
            i += 1
        return held.most_common(1)[0][0] if held else '?'

    causes = collections.Counter()
    for start, elapsed, _ in slow:
        i, j = bisect.bisect_left(starts, start), bisect.bisect_right(starts, start + elapsed)
        inside = delays[i:j]
        if not inside or max(d[1] for d in inside) < BIG_DELAY_NS:
            causes['no wake-up inside waited 100 us (several shorter waits, or time on a CPU)'] += 1
            continue
        w, delay, task, cpu = max(inside, key=lambda d: d[1])
        who = holder(cpu, w, w + delay)
        causes[f'{task} waited {"for an idle vCPU to wake" if who == "swapper" else "behind " + who}'] += 1

    print(f'{len(slow)} requests over the threshold; the longest wake-up delay inside each, and what held that CPU:')
    for cause, count in causes.most_common():
        print(f'  {count:5d}  {cause}')
    per_task = collections.defaultdict(list)
    for _, delay, task, _ in delays:
        per_task[task].append(delay)
    print('wake-up to running, whole trace (us):        count      p50      p99    p99.9      max')
    for task, values in sorted(per_task.items(), key=lambda kv: -len(kv[1]))[:6]:
        values.sort()
        n = len(values)
        pick = lambda q: values[min(n - 1, int(n * q))] / 1000
        print(f'  {task:40s} {n:7d} {pick(.5):8.1f} {pick(.99):8.1f} {pick(.999):8.1f} {values[-1] / 1000:8.1f}')
    for task in sorted(t for t in stretches if t.startswith(proxy)):
        values = sorted(stretches[task], reverse=True)
        print(f'{task}: {len(values)} stretches on a CPU, the longest (us): '
              + ', '.join(f'{v / 1000:.0f}' for v in values[:5]))


if __name__ == '__main__':
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    analyse(*load(sys.argv[1], sys.argv[2]), sys.argv[3])
