//! bbolt database files: the format etcd keeps its data in, and therefore the format of the
//! file `etcdctl snapshot save` receives. Keel writes its backups in it (so `etcdctl snapshot
//! status` and `etcdctl snapshot restore` read them) and reads it (so `keel snapshot restore`
//! takes a backup of a real etcd cluster). This module knows the file format only; which
//! buckets etcd keeps and what is in them is [`crate::backup`]'s business.
//!
//! # The format (bbolt 1.3, the version etcd 3.4 and 3.5 use)
//!
//! The file is a sequence of pages of `page_size` bytes (4096 here), numbered from 0. Every
//! page starts with a 16-byte header: page id (u64), flags (u16: 0x01 branch, 0x02 leaf,
//! 0x04 meta, 0x10 freelist), element count (u16) and `overflow` (u32): a page whose content
//! does not fit continues into the next `overflow` pages. All integers are little-endian.
//!
//! - Pages 0 and 1 are **meta pages**: magic `0xED0CDAED`, version 2, page size, flags, the
//!   root bucket (its root page id and a sequence), the freelist's page id, the high-water mark
//!   (the number of pages in the file), the transaction id and an FNV-1a 64 checksum of the
//!   preceding 56 bytes. A reader takes the valid meta page with the higher transaction id.
//! - A **freelist** page lists the ids of unused pages (none in the files written here).
//! - A bucket is a B+tree. **Leaf** elements are `{flags, pos, ksize, vsize}` (16 bytes each,
//!   right after the header); `pos` is the distance from the element to its key, and the value
//!   follows the key. **Branch** elements are `{pos, ksize, child page id}`, keyed by the first
//!   key of the child. Keys are sorted bytewise within a page and across the tree.
//! - The **root bucket** is a tree whose leaf elements carry flag 0x01 and name the top-level
//!   buckets; the value of such an element is a bucket header `{root page id, sequence}` (16
//!   bytes). A small bucket may be *inline*: root page id 0, and its single leaf page follows
//!   the header inside the value (etcd's small buckets are; the writer here never makes them).
//!
//! # Worked example
//!
//! [`BoltWriter`] takes buckets whose keys arrive sorted, packs elements into leaf pages in
//! order, then builds the branch levels from the first key of each page (in two passes, since
//! the meta pages at the front name the root page and the page count; see its docs). Writing bucket `key`
//! with 300 entries of 40 bytes each (56 bytes with their element) and then bucket `meta` with
//! two small entries gives:
//!
//! ```text
//! page 0, 1   meta (txid 1 and 2): root bucket at page 10, freelist at page 2, 11 pages
//! page 2      freelist, empty
//! page 3..=7  leaves of `key`: 72, 72, 72, 72 and 12 entries (16 + 72 * 56 = 4048 bytes;
//!             a 73rd element would not fit, so it starts the next page)
//! page 8      branch of `key`, its root: five elements (first key of each leaf, its page)
//! page 9      leaf of `meta`, its root: two elements
//! page 10     leaf of the root bucket: `key` -> {root 8, sequence 0} and `meta` -> {9, 0},
//!             flag 0x01, sorted by name
//! ```
//!
//! The meta pages say: root 10, freelist 2, high-water mark 11. Every page below the mark is
//! reachable from the root or is the freelist — what bbolt's `tx.Check()` (run by `etcdctl
//! snapshot status`) verifies.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Page size of the files written here (bbolt's default on Linux).
pub const PAGE_SIZE: usize = 4096;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BUCKET_HEADER: usize = 16;
/// Bytes of the meta structure covered by its checksum.
const META_SUMMED: usize = 56;

const FLAG_BRANCH: u16 = 0x01;
const FLAG_LEAF: u16 = 0x02;
const FLAG_META: u16 = 0x04;
const FLAG_FREELIST: u16 = 0x10;
/// Leaf element flag: the element is a nested bucket.
const ELEMENT_BUCKET: u32 = 0x01;
/// Nesting deeper than this is taken for a cycle in a corrupt file.
const MAX_DEPTH: usize = 64;

/// Errors of reading or writing a bbolt file.
#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not a bbolt database: {0}")]
    Corrupt(String),
    #[error("keys must be written in increasing order")]
    Unsorted,
}

impl From<BoltError> for io::Error {
    fn from(e: BoltError) -> Self {
        match e {
            BoltError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

fn corrupt(msg: impl Into<String>) -> BoltError {
    BoltError::Corrupt(msg.into())
}

/// FNV-1a, 64 bits (bbolt's meta checksum).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ----------------------------------------------------------------------------------------
// Writing
// ----------------------------------------------------------------------------------------

/// One page being filled: its elements (flags, key, value or child page id).
#[derive(Default)]
struct PendingPage {
    elements: Vec<(u32, Vec<u8>, Vec<u8>)>,
    /// Header plus elements plus keys and values.
    bytes: usize,
}

impl PendingPage {
    fn new() -> Self {
        Self {
            elements: Vec::new(),
            bytes: PAGE_HEADER,
        }
    }
}

/// The bucket being written: its current leaf and the pages already written, by first key.
struct OpenBucket {
    name: Vec<u8>,
    leaf: PendingPage,
    last_key: Option<Vec<u8>>,
    children: Vec<(Vec<u8>, u64)>,
}

/// Where a database's pages go, computed by a first pass ([`BoltWriter::layout`]): what the
/// meta pages at the start of the file must say before anything else is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoltLayout {
    /// Page id of the root bucket's root page.
    pub root: u64,
    /// Pages in the file (its high-water mark).
    pub pages: u64,
}

impl BoltLayout {
    /// Size of the database in bytes.
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }
}

/// Writes a bbolt database from buckets whose keys are added in increasing order, one bucket at
/// a time, streaming: nothing but the first key of each page is kept in memory, and the output
/// is written front to back (no seeking), so it can go straight to a socket.
///
/// The meta pages come first in the file but name the root page and the page count, known only
/// at the end; so a database is written in two passes making the same calls: the first on
/// [`BoltWriter::layout`], which only counts pages, the second on [`BoltWriter::write`] with the
/// first pass's [`BoltLayout`] (`crate::backup::stream_backup` runs both over one view of the
/// store).
pub struct BoltWriter<'a> {
    out: Option<&'a mut dyn Write>,
    promised: Option<BoltLayout>,
    next_page: u64,
    open: Option<OpenBucket>,
    buckets: Vec<(Vec<u8>, u64)>,
}

impl BoltWriter<'static> {
    /// The first pass: lays the database out, writing nothing.
    pub fn layout() -> Self {
        Self {
            out: None,
            promised: None,
            next_page: 3,
            open: None,
            buckets: Vec::new(),
        }
    }
}

impl<'a> BoltWriter<'a> {
    /// The second pass: writes the meta pages and the freelist for `layout` to `out` at once,
    /// then every page as the same calls as in the first pass produce it.
    pub fn write(out: &'a mut dyn Write, layout: BoltLayout) -> Result<Self, BoltError> {
        let mut head = vec![0u8; 3 * PAGE_SIZE];
        for (page_id, txid) in [(0u64, 1u64), (1, 2)] {
            let p = &mut head[page_id as usize * PAGE_SIZE..][..PAGE_SIZE];
            p[0..8].copy_from_slice(&page_id.to_le_bytes());
            p[8..10].copy_from_slice(&FLAG_META.to_le_bytes());
            let m = &mut p[PAGE_HEADER..];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..8].copy_from_slice(&VERSION.to_le_bytes());
            m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            // flags (12..16) and the root bucket's sequence (24..32) stay 0
            m[16..24].copy_from_slice(&layout.root.to_le_bytes());
            m[32..40].copy_from_slice(&2u64.to_le_bytes());
            m[40..48].copy_from_slice(&layout.pages.to_le_bytes());
            m[48..56].copy_from_slice(&txid.to_le_bytes());
            let sum = fnv1a64(&m[..META_SUMMED]);
            m[56..64].copy_from_slice(&sum.to_le_bytes());
        }
        let free = &mut head[2 * PAGE_SIZE..];
        free[0..8].copy_from_slice(&2u64.to_le_bytes());
        free[8..10].copy_from_slice(&FLAG_FREELIST.to_le_bytes());
        out.write_all(&head)?;
        Ok(Self {
            out: Some(out),
            promised: Some(layout),
            next_page: 3,
            open: None,
            buckets: Vec::new(),
        })
    }

    /// Starts a top-level bucket (ending the one before). Names must be distinct; they may
    /// come in any order.
    pub fn begin_bucket(&mut self, name: &[u8]) -> Result<(), BoltError> {
        self.end_bucket()?;
        if self.buckets.iter().any(|(n, _)| n == name) {
            return Err(corrupt(format!(
                "bucket {:?} written twice",
                String::from_utf8_lossy(name)
            )));
        }
        self.open = Some(OpenBucket {
            name: name.to_vec(),
            leaf: PendingPage::new(),
            last_key: None,
            children: Vec::new(),
        });
        Ok(())
    }

    /// Adds an entry to the open bucket; keys must increase strictly.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        let Some(mut bucket) = self.open.take() else {
            return Err(corrupt("put outside a bucket"));
        };
        let result = self.add_to_bucket(&mut bucket, key, value);
        self.open = Some(bucket);
        result
    }

    fn add_to_bucket(
        &mut self,
        bucket: &mut OpenBucket,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), BoltError> {
        if key.is_empty() || bucket.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(BoltError::Unsorted);
        }
        let size = ELEMENT + key.len() + value.len();
        if !bucket.leaf.elements.is_empty() && bucket.leaf.bytes + size > PAGE_SIZE {
            let page = std::mem::replace(&mut bucket.leaf, PendingPage::new());
            let first = page.elements[0].1.clone();
            let id = self.write_page(FLAG_LEAF, &page)?;
            bucket.children.push((first, id));
        }
        bucket.leaf.bytes += size;
        bucket.leaf.elements.push((0, key.to_vec(), value.to_vec()));
        bucket.last_key = Some(key.to_vec());
        Ok(())
    }

    /// Ends the open bucket, if any: writes its last leaf and its branch levels.
    fn end_bucket(&mut self) -> Result<(), BoltError> {
        let Some(mut bucket) = self.open.take() else {
            return Ok(());
        };
        if !bucket.leaf.elements.is_empty() || bucket.children.is_empty() {
            let page = std::mem::take(&mut bucket.leaf);
            let first = page
                .elements
                .first()
                .map(|e| e.1.clone())
                .unwrap_or_default();
            let id = self.write_page(FLAG_LEAF, &page)?;
            bucket.children.push((first, id));
        }
        let root = self.build_branches(bucket.children)?;
        self.buckets.push((bucket.name, root));
        Ok(())
    }

    /// Writes branch levels above `children` (first key, page id) until one page remains;
    /// returns its id.
    fn build_branches(&mut self, mut children: Vec<(Vec<u8>, u64)>) -> Result<u64, BoltError> {
        while children.len() > 1 {
            let mut parents = Vec::new();
            let mut page = PendingPage::new();
            for (key, id) in children {
                let size = ELEMENT + key.len();
                if !page.elements.is_empty() && page.bytes + size > PAGE_SIZE {
                    let full = std::mem::replace(&mut page, PendingPage::new());
                    let first = full.elements[0].1.clone();
                    parents.push((first, self.write_page(FLAG_BRANCH, &full)?));
                }
                page.bytes += size;
                page.elements.push((0, key, id.to_le_bytes().to_vec()));
            }
            let first = page.elements[0].1.clone();
            parents.push((first, self.write_page(FLAG_BRANCH, &page)?));
            children = parents;
        }
        children
            .first()
            .map(|(_, id)| *id)
            .ok_or_else(|| corrupt("a bucket without pages"))
    }

    /// Takes the next page id for `page` (with overflow pages if it needs them) and, in the
    /// second pass, writes it.
    fn write_page(&mut self, flags: u16, page: &PendingPage) -> Result<u64, BoltError> {
        let id = self.next_page;
        let pages = page.bytes.div_ceil(PAGE_SIZE).max(1);
        self.next_page += pages as u64;
        let Some(out) = self.out.as_mut() else {
            return Ok(id);
        };
        let count = u16::try_from(page.elements.len())
            .map_err(|_| corrupt("too many elements for one page"))?;
        let mut buf = vec![0u8; pages * PAGE_SIZE];
        buf[0..8].copy_from_slice(&id.to_le_bytes());
        buf[8..10].copy_from_slice(&flags.to_le_bytes());
        buf[10..12].copy_from_slice(&count.to_le_bytes());
        buf[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        let mut data = PAGE_HEADER + page.elements.len() * ELEMENT;
        for (i, (elem_flags, key, value)) in page.elements.iter().enumerate() {
            let at = PAGE_HEADER + i * ELEMENT;
            let pos = (data - at) as u32;
            if flags == FLAG_BRANCH {
                buf[at..at + 4].copy_from_slice(&pos.to_le_bytes());
                buf[at + 4..at + 8].copy_from_slice(&(key.len() as u32).to_le_bytes());
                buf[at + 8..at + 16].copy_from_slice(value);
                buf[data..data + key.len()].copy_from_slice(key);
                data += key.len();
            } else {
                buf[at..at + 4].copy_from_slice(&elem_flags.to_le_bytes());
                buf[at + 4..at + 8].copy_from_slice(&pos.to_le_bytes());
                buf[at + 8..at + 12].copy_from_slice(&(key.len() as u32).to_le_bytes());
                buf[at + 12..at + 16].copy_from_slice(&(value.len() as u32).to_le_bytes());
                buf[data..data + key.len()].copy_from_slice(key);
                data += key.len();
                buf[data..data + value.len()].copy_from_slice(value);
                data += value.len();
            }
        }
        out.write_all(&buf)?;
        Ok(id)
    }

    /// Ends the last bucket and writes the root bucket. Returns the layout; in the second pass,
    /// fails if it is not the one the first pass computed (the two passes saw different data).
    pub fn finish(mut self) -> Result<BoltLayout, BoltError> {
        self.end_bucket()?;
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort();
        // The root bucket's tree: one element per top-level bucket.
        let mut children = Vec::new();
        let mut page = PendingPage::new();
        for (name, root) in buckets {
            let mut header = [0u8; BUCKET_HEADER];
            header[..8].copy_from_slice(&root.to_le_bytes());
            let size = ELEMENT + name.len() + BUCKET_HEADER;
            if !page.elements.is_empty() && page.bytes + size > PAGE_SIZE {
                let full = std::mem::replace(&mut page, PendingPage::new());
                let first = full.elements[0].1.clone();
                children.push((first, self.write_page(FLAG_LEAF, &full)?));
            }
            page.bytes += size;
            page.elements.push((ELEMENT_BUCKET, name, header.to_vec()));
        }
        if !page.elements.is_empty() || children.is_empty() {
            let first = page
                .elements
                .first()
                .map(|e| e.1.clone())
                .unwrap_or_default();
            children.push((first, self.write_page(FLAG_LEAF, &page)?));
        }
        let root = self.build_branches(children)?;
        let layout = BoltLayout {
            root,
            pages: self.next_page,
        };
        if let Some(promised) = self.promised
            && promised != layout
        {
            return Err(corrupt(format!(
                "the second pass laid out {layout:?}, the first {promised:?}"
            )));
        }
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
        }
        Ok(layout)
    }
}

// ----------------------------------------------------------------------------------------
// Reading
// ----------------------------------------------------------------------------------------

/// Where a bucket's tree is: pages of the file, or a leaf page carried inline in its header's
/// value.
#[derive(Debug, Clone)]
pub enum BucketRoot {
    Page(u64),
    Inline(Vec<u8>),
}

/// One element of a bucket, as [`BoltReader::for_each`] hands it over.
pub struct Element<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// The element is a nested bucket (its value is a bucket header).
    pub is_bucket: bool,
}

/// Reads a bbolt file: the top-level buckets and every element of a bucket, in key order.
/// Every offset is checked against the page it is in, so a damaged file gives an error, never
/// a panic or an endless walk.
pub struct BoltReader {
    file: File,
    page_size: usize,
    root: u64,
    high_water: u64,
}

impl BoltReader {
    /// Opens the file at `path`, whose first `len` bytes are the database (the rest, such as
    /// etcd's SHA-256 trailer, is ignored).
    pub fn open(path: &Path, len: u64) -> Result<Self, BoltError> {
        let file = File::open(path)?;
        let mut best: Option<(u64, usize, u64, u64)> = None;
        let mut first_error = None;
        // Meta page 0 is at offset 0; page 1 is one page further, and the page size is in the
        // meta page itself (bbolt falls back to the other meta page if one is damaged).
        let mut header = [0u8; PAGE_HEADER + 64];
        for which in 0..2u64 {
            let offset = match (which, best) {
                (0, _) => 0,
                (_, Some((_, page_size, _, _))) => page_size as u64,
                (_, None) => PAGE_SIZE as u64,
            };
            if offset + header.len() as u64 > len {
                first_error.get_or_insert_with(|| corrupt("the file is too short"));
                continue;
            }
            file.read_exact_at(&mut header, offset)?;
            match parse_meta(&header[PAGE_HEADER..]) {
                Ok(meta) => {
                    if best.is_none_or(|b| meta.0 > b.0) {
                        best = Some(meta);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some((_, page_size, root, high_water)) = best else {
            return Err(first_error.unwrap_or_else(|| corrupt("no valid meta page")));
        };
        if high_water.saturating_mul(page_size as u64) > len {
            return Err(corrupt(format!(
                "the file is truncated: {high_water} pages of {page_size} bytes, {len} bytes"
            )));
        }
        Ok(Self {
            file,
            page_size,
            root,
            high_water,
        })
    }

    /// Pages in the database (its size is this times the page size).
    pub fn pages(&self) -> u64 {
        self.high_water
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The top-level buckets, by name.
    pub fn buckets(&self) -> Result<Vec<(Vec<u8>, BucketRoot)>, BoltError> {
        let mut out = Vec::new();
        self.for_each(&BucketRoot::Page(self.root), &mut |e| {
            if !e.is_bucket {
                return Err(corrupt("a plain value in the root bucket"));
            }
            out.push((e.key.to_vec(), bucket_root(e.value)?));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `visit` with every element of the bucket, in key order.
    pub fn for_each(&self, bucket: &BucketRoot, visit: &mut Visitor<'_>) -> Result<(), BoltError> {
        let mut budget = self.high_water;
        match bucket {
            BucketRoot::Page(id) => self.walk(*id, 0, &mut budget, visit),
            BucketRoot::Inline(page) => walk_page(page, visit, &mut |_, _| {
                Err(corrupt("an inline bucket with a branch page"))
            }),
        }
    }

    fn walk(
        &self,
        id: u64,
        depth: usize,
        budget: &mut u64,
        visit: &mut Visitor<'_>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(corrupt("the tree has a cycle"));
        }
        *budget -= 1;
        let page = self.read_page(id)?;
        walk_page(&page, visit, &mut |child, visit| {
            self.walk(child, depth + 1, budget, visit)
        })
    }

    fn read_page(&self, id: u64) -> Result<Vec<u8>, BoltError> {
        if id < 2 || id >= self.high_water {
            return Err(corrupt(format!("page {id} is outside the database")));
        }
        let mut header = [0u8; PAGE_HEADER];
        self.file
            .read_exact_at(&mut header, id * self.page_size as u64)?;
        let overflow = u64::from(u32::from_le_bytes(
            header[12..16].try_into().unwrap_or_default(),
        ));
        if id + overflow >= self.high_water {
            return Err(corrupt(format!("page {id} overflows the database")));
        }
        let mut page = vec![0u8; (overflow as usize + 1) * self.page_size];
        self.file
            .read_exact_at(&mut page, id * self.page_size as u64)?;
        Ok(page)
    }
}

/// (txid, page size, root page, high-water mark) of a valid meta structure.
fn parse_meta(m: &[u8]) -> Result<(u64, usize, u64, u64), BoltError> {
    let u32_at = |at: usize| u32::from_le_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&m[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(0) != MAGIC {
        return Err(corrupt("bad magic number"));
    }
    if u32_at(4) != VERSION {
        return Err(corrupt(format!("unsupported version {}", u32_at(4))));
    }
    let checksum = u64_at(56);
    if checksum != 0 && checksum != fnv1a64(&m[..META_SUMMED]) {
        return Err(corrupt("meta page checksum mismatch"));
    }
    let page_size = u32_at(8) as usize;
    if !(512..=(1 << 20)).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(corrupt(format!("unsupported page size {page_size}")));
    }
    Ok((u64_at(48), page_size, u64_at(16), u64_at(40)))
}

fn bucket_root(value: &[u8]) -> Result<BucketRoot, BoltError> {
    let header: [u8; 8] = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("a bucket header is too short"))?;
    if value.len() < BUCKET_HEADER {
        return Err(corrupt("a bucket header is too short"));
    }
    match u64::from_le_bytes(header) {
        0 => Ok(BucketRoot::Inline(value[BUCKET_HEADER..].to_vec())),
        id => Ok(BucketRoot::Page(id)),
    }
}

/// What receives a bucket's elements.
type Visitor<'v> = dyn FnMut(Element<'_>) -> Result<(), BoltError> + 'v;

/// Visits the elements of one page: leaf elements go to `visit`, branch children to `descend`.
fn walk_page(
    page: &[u8],
    visit: &mut Visitor<'_>,
    descend: &mut dyn FnMut(u64, &mut Visitor<'_>) -> Result<(), BoltError>,
) -> Result<(), BoltError> {
    if page.len() < PAGE_HEADER {
        return Err(corrupt("a page is too short"));
    }
    let flags = u16::from_le_bytes([page[8], page[9]]);
    let count = usize::from(u16::from_le_bytes([page[10], page[11]]));
    let u32_at = |at: usize| -> Result<usize, BoltError> {
        page.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| corrupt("an element is outside its page"))
    };
    let slice = |at: usize, len: usize| -> Result<&[u8], BoltError> {
        at.checked_add(len)
            .and_then(|end| page.get(at..end))
            .ok_or_else(|| corrupt("a key or value is outside its page"))
    };
    if flags & FLAG_LEAF != 0 {
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let elem_flags = u32_at(at)? as u32;
            let pos = u32_at(at + 4)?;
            let ksize = u32_at(at + 8)?;
            let vsize = u32_at(at + 12)?;
            let key = slice(at + pos, ksize)?;
            let value = slice(at + pos + ksize, vsize)?;
            visit(Element {
                key,
                value,
                is_bucket: elem_flags & ELEMENT_BUCKET != 0,
            })?;
        }
        Ok(())
    } else if flags & FLAG_BRANCH != 0 {
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let child = slice(at + 8, 8)?;
            let mut id = [0u8; 8];
            id.copy_from_slice(child);
            descend(u64::from_le_bytes(id), visit)?;
        }
        Ok(())
    } else {
        Err(corrupt(format!(
            "unexpected page type {flags:#x} in a tree"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a database to `path` by calling `build` twice (see [`BoltWriter`]); `build` must make
    /// the same calls both times. Returns the file's size.
    fn write_file(
        path: &Path,
        mut build: impl FnMut(&mut BoltWriter<'_>) -> Result<(), BoltError>,
    ) -> Result<u64, BoltError> {
        let mut first = BoltWriter::layout();
        build(&mut first)?;
        let layout = first.finish()?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
        let mut second = BoltWriter::write(&mut out, layout)?;
        build(&mut second)?;
        second.finish()?;
        out.into_inner()
            .map_err(|e| BoltError::Io(e.into_error()))?
            .sync_all()?;
        Ok(layout.size())
    }

    fn read_all(reader: &BoltReader, root: &BucketRoot) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        reader
            .for_each(root, &mut |e| {
                out.push((e.key.to_vec(), e.value.to_vec()));
                Ok(())
            })
            .expect("walk");
        out
    }

    #[test]
    fn round_trip_with_branches_overflow_and_empty_buckets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let many: Vec<(Vec<u8>, Vec<u8>)> = (0..20_000u32)
            .map(|i| {
                (
                    format!("key/{i:08}").into_bytes(),
                    vec![b'v'; (i % 97) as usize],
                )
            })
            .collect();
        let big = vec![7u8; 3 * PAGE_SIZE + 100];
        let size = write_file(&path, |w| {
            // Written out of name order on purpose: the root bucket sorts them.
            w.begin_bucket(b"meta")?;
            w.put(b"a", b"1")?;
            w.put(b"b", b"2")?;
            w.begin_bucket(b"key")?;
            for (k, v) in &many {
                w.put(k, v)?;
            }
            w.begin_bucket(b"big")?;
            w.put(b"small", b"x")?;
            w.put(b"xl", &big)?;
            w.begin_bucket(b"empty")
        })
        .expect("write");
        assert_eq!(size, std::fs::metadata(&path).expect("meta").len());

        let r = BoltReader::open(&path, size).expect("open");
        assert_eq!(r.pages() * PAGE_SIZE as u64, size);
        let buckets = r.buckets().expect("buckets");
        let names: Vec<&[u8]> = buckets.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"big"[..], b"empty", b"key", b"meta"]);
        assert_eq!(read_all(&r, &buckets[0].1)[1].1, big);
        assert!(read_all(&r, &buckets[1].1).is_empty());
        assert_eq!(read_all(&r, &buckets[2].1), many);
        assert_eq!(
            read_all(&r, &buckets[3].1),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
    }

    /// The layout of the module docs' worked example, page by page.
    #[test]
    fn worked_example_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let size = write_file(&path, |w| {
            w.begin_bucket(b"key")?;
            for i in 0..300u32 {
                // 40 bytes of key and value.
                w.put(format!("{i:08}").as_bytes(), &[0u8; 32])?;
            }
            w.begin_bucket(b"meta")?;
            w.put(b"a", b"1")?;
            w.put(b"b", b"2")
        })
        .expect("write");
        let file = std::fs::read(&path).expect("read");
        assert_eq!(size, 11 * PAGE_SIZE as u64);
        let page = |id: usize| &file[id * PAGE_SIZE..(id + 1) * PAGE_SIZE];
        let u16_at = |p: &[u8], at: usize| u16::from_le_bytes([p[at], p[at + 1]]);
        let u64_at =
            |p: &[u8], at: usize| u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"));
        for (id, txid) in [(0, 1), (1, 2)] {
            let m = &page(id)[PAGE_HEADER..];
            assert_eq!(u64_at(m, 16), 10, "root bucket page");
            assert_eq!(u64_at(m, 32), 2, "freelist page");
            assert_eq!(u64_at(m, 40), 11, "high-water mark");
            assert_eq!(u64_at(m, 48), txid);
        }
        assert_eq!(u16_at(page(2), 8), FLAG_FREELIST);
        let counts: Vec<(u16, u16)> = (3..=10)
            .map(|id| (u16_at(page(id), 8), u16_at(page(id), 10)))
            .collect();
        let (leaf, branch) = (FLAG_LEAF, FLAG_BRANCH);
        assert_eq!(
            counts,
            [
                (leaf, 72),
                (leaf, 72),
                (leaf, 72),
                (leaf, 72),
                (leaf, 12),
                (branch, 5),
                (leaf, 2),
                (leaf, 2)
            ]
        );
        let r = BoltReader::open(&path, size).expect("open");
        let buckets = r.buckets().expect("buckets");
        assert!(matches!(buckets[0].1, BucketRoot::Page(8)));
        assert!(matches!(buckets[1].1, BucketRoot::Page(9)));
    }

    #[test]
    fn keys_out_of_order_are_refused() {
        let mut w = BoltWriter::layout();
        w.begin_bucket(b"b").expect("bucket");
        w.put(b"2", b"").expect("put");
        assert!(matches!(w.put(b"1", b""), Err(BoltError::Unsorted)));
        assert!(matches!(w.put(b"2", b""), Err(BoltError::Unsorted)));
        assert!(w.begin_bucket(b"b").is_err(), "a bucket name twice");
    }

    #[test]
    fn passes_that_differ_are_an_error() {
        let mut first = BoltWriter::layout();
        first.begin_bucket(b"b").expect("bucket");
        first.put(b"k", b"v").expect("put");
        let layout = first.finish().expect("layout");
        let mut out = Vec::new();
        let mut second = BoltWriter::write(&mut out, layout).expect("write");
        second.begin_bucket(b"b").expect("bucket");
        second.put(b"k", &[0u8; 5000]).expect("put");
        assert!(
            second.finish().is_err(),
            "a larger value moves the root page"
        );
    }

    #[test]
    fn damaged_files_give_errors_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let size = write_file(&path, |w| {
            w.begin_bucket(b"key")?;
            for i in 0..2000u32 {
                w.put(format!("{i:06}").as_bytes(), &[1u8; 40])?;
            }
            Ok(())
        })
        .expect("write");
        let good = std::fs::read(&path).expect("read");
        // Truncated.
        assert!(BoltReader::open(&path, size - 1).is_err());
        // Both meta pages damaged.
        let mut bad = good.clone();
        bad[PAGE_HEADER + 20] ^= 1;
        bad[PAGE_SIZE + PAGE_HEADER + 20] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        assert!(BoltReader::open(&path, size).is_err());
        // One meta page damaged: the other one is used.
        let mut one = good.clone();
        one[PAGE_SIZE + PAGE_HEADER + 20] ^= 1;
        std::fs::write(&path, &one).expect("write");
        let r = BoltReader::open(&path, size).expect("the other meta page");
        assert_eq!(r.buckets().expect("buckets").len(), 1);
        // Every byte of every data page flipped in turn: errors or data, never a panic.
        for at in (3 * PAGE_SIZE..good.len()).step_by(61) {
            let mut bad = good.clone();
            bad[at] = bad[at].wrapping_add(0x5b);
            std::fs::write(&path, &bad).expect("write");
            if let Ok(r) = BoltReader::open(&path, size)
                && let Ok(buckets) = r.buckets()
            {
                for (_, root) in buckets {
                    let _ = r.for_each(&root, &mut |_| Ok(()));
                }
            }
        }
    }
}
