"""Sync latency of a memory-mapped segment whose blocks were preallocated with fallocate
(unwritten extents: the first sync of each block also commits its conversion) against one
whose blocks were written with zeroes first (written extents), as the WAL's segments could be
"prepared" off the hot path. Appends 256-byte records into the mapping, fdatasync after each,
3,000 per run, both kinds alternating, three rounds. Run from a directory on the WAL's file
system: python3 benches/wal/extents.py
"""
import os, mmap, time, statistics, sys
def run(mode, n=3000, rec=256):
    path = f"seg_{mode}.bin"
    if os.path.exists(path): os.remove(path)
    size = 64<<20
    fd = os.open(path, os.O_RDWR|os.O_CREAT, 0o644)
    if mode == "fallocate":
        os.posix_fallocate(fd, 0, size)
    else:
        z = b"\0"*(1<<20)
        for i in range(64): os.pwrite(fd, z, i<<20)
    os.fsync(fd)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ|mmap.PROT_WRITE)
    lat = []
    data = b"x"*rec
    off = 0
    for i in range(n):
        t = time.perf_counter()
        m[off:off+rec] = data
        os.fdatasync(fd)
        lat.append((time.perf_counter()-t)*1e6)
        off += rec
    m.close(); os.close(fd); os.remove(path)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat)*0.99)]
for r in range(3):
    for mode in ("fallocate","written"):
        p50, p99 = run(mode)
        print(f"{mode:10s} p50 {p50:7.1f} us  p99 {p99:8.1f} us", flush=True)
