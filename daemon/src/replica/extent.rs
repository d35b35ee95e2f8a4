//! Extent maps: which layer holds data for each 4 KiB block.
//!
//! Owns the two read-path structures and how they are built from the layer
//! files' allocation (`SEEK_DATA`/`SEEK_HOLE`):
//! - [`LowerMap`]: the immutable snapshot layers merged once into one sorted,
//!   non-overlapping extent list (newest layer wins), binary-searched.
//! - [`HeadBitmap`]: one atomic bit per block of the head, set lock-free by
//!   the I/O threads as writes complete.
//!
//! All positions here are in blocks ([`BLOCK_SIZE`] units) unless a name
//! says bytes.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BLOCK_SIZE;

/// Blocks `[start, end)` of the volume whose newest data is in `layer`
/// (index into the replica's oldest-first layer list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
    pub layer: u32,
}

/// Data ranges of an open file, in blocks, rounded outward (data anywhere in
/// a block makes the whole block data), sorted and merged. Only the first
/// `len_bytes` of the file are considered.
pub fn data_blocks(fd: RawFd, len_bytes: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: u64 = 0;
    while pos < len_bytes {
        let data = match lseek(fd, pos, libc::SEEK_DATA)? {
            Some(d) if d < len_bytes => d,
            _ => break, // ENXIO: no data at or after `pos`.
        };
        let hole = lseek(fd, data, libc::SEEK_HOLE)?
            .unwrap_or(len_bytes)
            .min(len_bytes);
        let (s, e) = (data / BLOCK_SIZE, hole.div_ceil(BLOCK_SIZE));
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
        if hole <= data {
            break; // Defensive: a filesystem must not report this; never loop.
        }
        pos = hole;
    }
    Ok(out)
}

/// `lseek` that maps `ENXIO` (no more data / past end) to `None`.
fn lseek(fd: RawFd, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads the descriptor table; an invalid fd yields
    // EBADF, not undefined behaviour.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The snapshot layers merged into one sorted, non-overlapping, coalesced
/// extent list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LowerMap {
    extents: Vec<Extent>,
}

/// What [`LowerMap::lookup`] found at a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The block is in this extent.
    In(Extent),
    /// No snapshot has the block; the next extent starts here (or `u64::MAX`).
    Gap { next: u64 },
}

impl LowerMap {
    /// Merges per-layer data ranges. `layers[i]` is layer `i`'s ranges;
    /// higher indices are newer and win where ranges overlap.
    pub fn build(layers: &[Vec<(u64, u64)>]) -> Self {
        // Paint newest first; each older layer only fills what is still
        // uncovered. The map holds start -> (end, layer), non-overlapping.
        let mut map: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        for (layer, ranges) in layers.iter().enumerate().rev() {
            let layer = layer as u32;
            for &(s, e) in ranges {
                gaps.clear();
                let mut cur = s;
                if let Some((_, &(pe, _))) = map.range(..=cur).next_back() {
                    cur = cur.max(pe);
                }
                if cur < e {
                    for (&ms, &(me, _)) in map.range(cur..e) {
                        if ms > cur {
                            gaps.push((cur, ms));
                        }
                        cur = cur.max(me);
                    }
                    if cur < e {
                        gaps.push((cur, e));
                    }
                }
                for &(gs, ge) in &gaps {
                    map.insert(gs, (ge, layer));
                }
            }
        }
        let mut extents: Vec<Extent> = Vec::with_capacity(map.len());
        for (start, (end, layer)) in map {
            match extents.last_mut() {
                Some(l) if l.end == start && l.layer == layer => l.end = end,
                _ => extents.push(Extent { start, end, layer }),
            }
        }
        LowerMap { extents }
    }

    /// The extent holding `block`, or where the next one starts.
    #[inline]
    pub fn lookup(&self, block: u64) -> Lookup {
        let i = self.extents.partition_point(|x| x.end <= block);
        match self.extents.get(i) {
            Some(x) if x.start <= block => Lookup::In(*x),
            Some(x) => Lookup::Gap { next: x.start },
            None => Lookup::Gap { next: u64::MAX },
        }
    }

    /// Splits a read of `buf.len()` bytes at `offset` of a `size`-byte
    /// volume into runs that one layer serves, calling `f(layer, offset,
    /// part)` for each (`None`: no layer holds data there). `EINVAL` when the
    /// range is unaligned or past the end.
    pub fn read_runs(
        &self,
        size: u64,
        offset: u64,
        buf: &mut [u8],
        mut f: impl FnMut(Option<u32>, u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= size);
        if end.is_none() || offset % BLOCK_SIZE != 0 || buf.len() as u64 % BLOCK_SIZE != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let want_end = (offset + buf.len() as u64) / BLOCK_SIZE;
        let mut pos = 0usize;
        while pos < buf.len() {
            let b = (offset + pos as u64) / BLOCK_SIZE;
            let (layer, run_end) = match self.lookup(b) {
                Lookup::In(x) => (Some(x.layer), x.end.min(want_end)),
                Lookup::Gap { next } => (None, next.min(want_end)),
            };
            let n = ((run_end - b) * BLOCK_SIZE) as usize;
            f(layer, offset + pos as u64, &mut buf[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    /// Byte ranges `(offset, len)` where some layer holds data, sorted.
    pub fn data_bytes(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.extents.len());
        for e in &self.extents {
            match out.last_mut() {
                // Neighbours from different layers are one range of data.
                Some(last) if last.1 == e.start => last.1 = e.end,
                _ => out.push((e.start, e.end)),
            }
        }
        out.into_iter()
            .map(|(s, e)| (s * BLOCK_SIZE, (e - s) * BLOCK_SIZE))
            .collect()
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
}

/// One bit per block of the head: set once the head holds that block.
/// Bits are only ever set while the replica is open (a write can never
/// un-write a block), so relaxed atomics suffice: the engine orders a read
/// after the write it depends on through its own completion handling.
#[derive(Debug)]
pub struct HeadBitmap {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl HeadBitmap {
    pub fn new(blocks: u64) -> Self {
        let n = blocks.div_ceil(64) as usize;
        HeadBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            blocks,
        }
    }

    /// A bitmap with the given ranges set.
    pub fn from_ranges(blocks: u64, ranges: &[(u64, u64)]) -> Self {
        let b = Self::new(blocks);
        for &(s, e) in ranges {
            b.set_range(s, e);
        }
        b
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Sets blocks `[start, end)`, clipped to the bitmap. Lock-free, no
    /// allocation.
    pub fn set_range(&self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut b = start;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64); // exclusive bit index in this word
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = self.words.get(w) {
                // Bits are only ever set while serving, so a load that sees
                // them all set is final: overwrites skip the atomic RMW and
                // the cache line stays shared between queue threads.
                if word.load(Ordering::Relaxed) & mask != mask {
                    word.fetch_or(mask, Ordering::Relaxed);
                }
            }
            b = b - lo + hi;
        }
    }

    /// Clears blocks `[start, end)` (a rebuild taking work off a dirty map).
    pub fn clear_range(&self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut b = start;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = self.words.get(w) {
                word.fetch_and(!mask, Ordering::SeqCst);
            }
            b = b - lo + hi;
        }
    }

    #[inline]
    pub fn get(&self, block: u64) -> bool {
        block < self.blocks
            && self
                .words
                .get((block / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) >> (block % 64) & 1 == 1)
    }

    /// First block in `[from, limit)` whose bit equals `set`, else `limit`.
    #[inline]
    pub fn next_with(&self, from: u64, limit: u64, set: bool) -> u64 {
        let limit = limit.min(self.blocks);
        let mut b = from;
        while b < limit {
            let w = (b / 64) as usize;
            let Some(word) = self.words.get(w) else { break };
            let mut v = word.load(Ordering::Relaxed);
            if !set {
                v = !v;
            }
            let v = v >> (b % 64);
            if v != 0 {
                return (b + u64::from(v.trailing_zeros())).min(limit);
            }
            b = (w as u64 + 1) * 64;
        }
        limit
    }

    /// Number of set blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The set bits as sorted, merged block ranges.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut b = 0;
        while b < self.blocks {
            let s = self.next_with(b, self.blocks, true);
            if s >= self.blocks {
                break;
            }
            let e = self.next_with(s, self.blocks, false);
            out.push((s, e));
            b = e;
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Per-block reference: newest layer holding each block.
    fn model(nblocks: u64, layers: &[Vec<(u64, u64)>]) -> Vec<Option<u32>> {
        let mut m = vec![None; nblocks as usize];
        for (i, r) in layers.iter().enumerate() {
            for &(s, e) in r {
                for b in s..e {
                    m[b as usize] = Some(i as u32);
                }
            }
        }
        m
    }

    fn ranges_strategy(n: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0..n, 1..20u64), 0..8).prop_map(move |v| {
            let mut v: Vec<(u64, u64)> = v.into_iter().map(|(s, l)| (s, (s + l).min(n))).collect();
            v.sort();
            // Merge so the input looks like data_blocks output.
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (s, e) in v {
                match out.last_mut() {
                    Some(l) if l.1 >= s => l.1 = l.1.max(e),
                    _ => out.push((s, e)),
                }
            }
            out
        })
    }

    proptest! {
        #[test]
        fn lower_map_matches_model(layers in proptest::collection::vec(ranges_strategy(200), 0..5)) {
            let m = model(200, &layers);
            let map = LowerMap::build(&layers);
            // Sorted, non-overlapping, coalesced.
            for w in map.extents().windows(2) {
                prop_assert!(w[0].end <= w[1].start);
                prop_assert!(!(w[0].end == w[1].start && w[0].layer == w[1].layer));
            }
            for b in 0..200u64 {
                let got = match map.lookup(b) {
                    Lookup::In(x) => { prop_assert!(x.start <= b && b < x.end); Some(x.layer) }
                    Lookup::Gap { next } => {
                        prop_assert!(next > b);
                        for c in b..next.min(200) { prop_assert_eq!(m[c as usize], None); }
                        None
                    }
                };
                prop_assert_eq!(got, m[b as usize], "block {}", b);
            }
        }

        #[test]
        fn bitmap_matches_model(ranges in proptest::collection::vec((0..300u64, 0..150u64), 0..10)) {
            let n = 300;
            let bm = HeadBitmap::new(n);
            let mut m = vec![false; n as usize];
            for &(s, l) in &ranges {
                bm.set_range(s, s + l);
                for b in s..(s + l).min(n) { m[b as usize] = true; }
            }
            for b in 0..n {
                prop_assert_eq!(bm.get(b), m[b as usize]);
                let ns = (b..n).find(|&c| m[c as usize]).unwrap_or(n);
                let nc = (b..n).find(|&c| !m[c as usize]).unwrap_or(n);
                prop_assert_eq!(bm.next_with(b, n, true), ns);
                prop_assert_eq!(bm.next_with(b, n, false), nc);
            }
            prop_assert_eq!(bm.count(), m.iter().filter(|x| **x).count() as u64);
            let rebuilt = HeadBitmap::from_ranges(n, &bm.ranges());
            for b in 0..n { prop_assert_eq!(rebuilt.get(b), m[b as usize]); }
        }
    }

    #[test]
    fn data_blocks_rounds_outward() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("f"))
            .unwrap();
        let len = 1024 * BLOCK_SIZE;
        f.set_len(len).unwrap();
        assert_eq!(data_blocks(f.as_raw_fd(), len).unwrap(), vec![]);
        f.write_all_at(b"x", 10 * BLOCK_SIZE + 100).unwrap();
        f.write_all_at(&vec![1u8; 3 * BLOCK_SIZE as usize], 500 * BLOCK_SIZE)
            .unwrap();
        f.sync_all().unwrap();
        let got = data_blocks(f.as_raw_fd(), len).unwrap();
        // Filesystems may allocate more than written (page granularity), but
        // the written blocks must be covered and nothing far away.
        let covered = |b: u64| got.iter().any(|&(s, e)| s <= b && b < e);
        assert!(covered(10) && covered(500) && covered(502), "{got:?}");
        assert!(!covered(0) && !covered(300) && !covered(1000), "{got:?}");
    }
}
