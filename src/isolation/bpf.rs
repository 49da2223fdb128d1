//! The few `bpf(2)` commands the hooks need, through the raw syscall: four LPM-trie maps,
//! programs of 16 and 22 instructions, and attaching, querying and detaching them on a cgroup.
//!
//! The programs are small enough to write as instructions here (what aya or libbpf would load
//! from a clang-compiled object), which keeps a BPF toolchain out of the build. Each program
//! builds a key `{prefix length, port, 0, address}` on its stack from its context (for
//! `connect()` the destination, for `bind()` the local address asked for) and looks it up in
//! its map: a hit refuses the call with EPERM, a miss lets it through. A key whose prefix
//! covers the port alone matches that port on every address.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// bpf(2) commands.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;

const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// Several programs may be attached to one cgroup, and all of them run for its descendants.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The four hooks: `connect()` and `bind()` of IPv4 and of IPv6 sockets (IPv4-mapped
/// addresses go through the IPv6 ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    Bind4,
    Bind6,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::Connect4, Hook::Connect6, Hook::Bind4, Hook::Bind6];

    fn attach_type(self) -> u32 {
        match self {
            Hook::Bind4 => 8,     // BPF_CGROUP_INET4_BIND
            Hook::Bind6 => 9,     // BPF_CGROUP_INET6_BIND
            Hook::Connect4 => 10, // BPF_CGROUP_INET4_CONNECT
            Hook::Connect6 => 11, // BPF_CGROUP_INET6_CONNECT
        }
    }

    /// The program's name in the kernel (at most 15 bytes): how a later worker and `cleanup`
    /// find the programs an earlier worker attached.
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::Connect4 => "iris_wk_conn4",
            Hook::Connect6 => "iris_wk_conn6",
            Hook::Bind4 => "iris_wk_bind4",
            Hook::Bind6 => "iris_wk_bind6",
        }
    }

    /// Whether the hook sees IPv6 sockets.
    pub fn is_v6(self) -> bool {
        matches!(self, Hook::Connect6 | Hook::Bind6)
    }

    /// Whether the hook is on `bind()` (else on `connect()`).
    pub fn is_bind(self) -> bool {
        matches!(self, Hook::Bind4 | Hook::Bind6)
    }

    /// Bytes of address in a key.
    pub fn address_len(self) -> usize {
        if self.is_v6() { 16 } else { 4 }
    }

    /// Bytes of a map key: prefix length (u32), port (2), zero (2), address.
    pub fn key_len(self) -> usize {
        4 + 4 + self.address_len()
    }
}

// `union bpf_attr` members, laid out as in linux/bpf.h, without implicit padding. The kernel
// reads the `size` bytes we pass and takes the rest as zero; some commands write results back
// (BPF_PROG_QUERY writes up to `revision`), so each call goes through a zeroed buffer the size
// of the whole union.

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct MapElemAttr {
    map_fd: u32,
    _pad0: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _reserved: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    /// Written by newer kernels whatever size we pass: the struct must reach it.
    revision: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info`, up to the name.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// Bytes of the whole `union bpf_attr` in current kernels, with room to spare.
const ATTR_BUFFER: usize = 256;

fn sys_bpf<T: Copy>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = std::mem::size_of::<T>();
    assert!(size <= ATTR_BUFFER, "a bpf_attr member larger than the union");
    let mut buffer = [0u64; ATTR_BUFFER / 8];
    // SAFETY: `T` is one of the #[repr(C)] plain-data structs above (no padding, no
    // references), no larger than the buffer; the kernel reads `size` bytes of it and may
    // write results within the union's size, which the buffer covers. Pointers inside `attr`
    // point to memory that outlives the call.
    let r = unsafe {
        std::ptr::copy_nonoverlapping(std::ptr::from_ref(attr).cast::<u8>(), buffer.as_mut_ptr().cast::<u8>(), size);
        let r = libc::syscall(libc::SYS_bpf, cmd, buffer.as_mut_ptr(), size);
        std::ptr::copy_nonoverlapping(buffer.as_ptr().cast::<u8>(), std::ptr::from_mut(attr).cast::<u8>(), size);
        r
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn fd_from(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(r).map_err(|_| io::Error::other("bpf returned no descriptor"))?;
    // SAFETY: the kernel just returned this new descriptor to us (BPF fds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().take(15)) {
        *o = b;
    }
    out
}

/// An LPM-trie map of keys `{prefix length, port, 0, address}` (values unused).
pub struct Map {
    fd: OwnedFd,
    key_len: usize,
}

impl Map {
    pub fn create(hook: Hook, max_entries: u32) -> io::Result<Map> {
        let key_len = hook.key_len();
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_LPM_TRIE,
            key_size: key_len as u32,
            value_size: 1,
            max_entries,
            map_flags: BPF_F_NO_PREALLOC,
            map_name: name16(hook.program_name()),
            ..Default::default()
        };
        Ok(Map { fd: fd_from(sys_bpf(BPF_MAP_CREATE, &mut attr)?)?, key_len })
    }

    fn elem(&self, cmd: libc::c_int, key: &[u8]) -> io::Result<()> {
        if key.len() != self.key_len {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "key of the wrong length"));
        }
        let value = [1u8];
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            ..Default::default()
        };
        sys_bpf(cmd, &mut attr).map(|_| ())
    }

    pub fn insert(&self, key: &[u8]) -> io::Result<()> {
        self.elem(BPF_MAP_UPDATE_ELEM, key)
    }

    pub fn remove(&self, key: &[u8]) -> io::Result<()> {
        match self.elem(BPF_MAP_DELETE_ELEM, key) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// One BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R10: u8 = 10;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}
/// dst = *(u32 *)(src + off)
fn load_u32(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// *(u32 *)(dst + off) = src
fn store_u32(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x63, dst, src, off, 0)
}
/// *(u16 *)(dst + off) = src
fn store_u16(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x6b, dst, src, off, 0)
}
/// *(u32 *)(dst + off) = imm
fn store_imm_u32(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
/// *(u16 *)(dst + off) = imm
fn store_imm_u16(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x6a, dst, 0, off, imm)
}
/// dst = src (64 bit)
fn mov(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// dst = imm (64 bit)
fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// dst += imm (64 bit)
fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
/// if dst == imm goto +off
fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// dst = the map of descriptor `fd` (a 64-bit immediate load with BPF_PSEUDO_MAP_FD: two
/// instruction slots).
fn load_map(dst: u8, fd: i32) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;

// Offsets in `struct bpf_sock_addr` (the program's context).
const CTX_USER_IP4: i16 = 4;
const CTX_USER_IP6: i16 = 8;
const CTX_USER_PORT: i16 = 24;

/// The program of `hook` over the map of descriptor `map_fd`.
///
/// The key is built at the top of the stack, 4-byte aligned as the verifier requires:
/// `[prefixlen u32][port u16 as on the wire][0u16][address as on the wire]`. The kernel gives
/// the port and address in network byte order; a load and a store of the same width keep
/// those bytes as they were, so no byte swapping is needed.
pub fn program(hook: Hook, map_fd: i32) -> Vec<Insn> {
    let key_len = hook.key_len() as i16;
    let key = -key_len; // stack offset of the key
    let mut p = vec![
        load_u32(R2, R1, CTX_USER_PORT),
        // The full length: port, padding and address.
        store_imm_u32(R10, key, i32::from(8 * (key_len - 4))),
        store_u16(R10, key + 4, R2),
        store_imm_u16(R10, key + 6, 0),
    ];
    if hook.is_v6() {
        for word in 0..4i16 {
            p.push(load_u32(R3, R1, CTX_USER_IP6 + 4 * word));
            p.push(store_u32(R10, key + 8 + 4 * word, R3));
        }
    } else {
        p.push(load_u32(R3, R1, CTX_USER_IP4));
        p.push(store_u32(R10, key + 8, R3));
    }
    p.extend(load_map(R1, map_fd));
    p.extend([
        mov(R2, R10),
        add_imm(R2, i32::from(key)),
        call(HELPER_MAP_LOOKUP_ELEM),
        // Not in the map: allow (1). In it: refuse (0: connect() or bind() fails with EPERM).
        jeq_imm(R0, 0, 2),
        mov_imm(R0, 0),
        exit(),
        mov_imm(R0, 1),
        exit(),
    ]);
    p
}

/// The instructions as the kernel reads them.
pub fn encode(insns: &[Insn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(insns.len() * 8);
    for i in insns {
        out.push(i.code);
        out.push(i.regs);
        out.extend_from_slice(&i.off.to_le_bytes());
        out.extend_from_slice(&i.imm.to_le_bytes());
    }
    out
}

/// A loaded program.
pub struct Program {
    fd: OwnedFd,
    hook: Hook,
}

impl Program {
    /// Loads `hook`'s program over `map`; a verifier refusal carries the verifier's log.
    pub fn load(hook: Hook, map: &Map) -> io::Result<Program> {
        let code = encode(&program(hook, map.fd.as_raw_fd()));
        let license = c"GPL";
        let mut log = vec![0u8; 16 * 1024];
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: (code.len() / 8) as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name16(hook.program_name()),
            expected_attach_type: hook.attach_type(),
            ..Default::default()
        };
        match sys_bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(r) => Ok(Program { fd: fd_from(r)?, hook }),
            Err(e) => {
                let text =
                    CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
                if text.trim().is_empty() {
                    Err(e)
                } else {
                    Err(io::Error::new(e.kind(), format!("{e}; verifier: {}", text.trim())))
                }
            }
        }
    }

    /// Attaches the program to the cgroup directory `cgroup` (an open descriptor), beside
    /// whatever else is attached there.
    pub fn attach(&self, cgroup: &OwnedFd) -> io::Result<()> {
        let mut attr = AttachAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.fd.as_raw_fd() as u32,
            attach_type: self.hook.attach_type(),
            attach_flags: BPF_F_ALLOW_MULTI,
            ..Default::default()
        };
        sys_bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
    }
}

fn info(fd: &OwnedFd) -> io::Result<ProgInfo> {
    let mut info = ProgInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// A program attached to a cgroup: its name, and a descriptor to detach it with.
pub struct Attached {
    pub name: String,
    fd: OwnedFd,
    hook: Hook,
}

impl Attached {
    /// Detaches it from `cgroup`.
    pub fn detach(&self, cgroup: &OwnedFd) -> io::Result<()> {
        let mut attr = AttachAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.fd.as_raw_fd() as u32,
            attach_type: self.hook.attach_type(),
            ..Default::default()
        };
        match sys_bpf(BPF_PROG_DETACH, &mut attr) {
            // Detached meanwhile (another cleanup, or the cgroup went).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// The programs attached directly to `cgroup` at `hook` (not those inherited from its
/// ancestors).
pub fn attached(cgroup: &OwnedFd, hook: Hook) -> io::Result<Vec<Attached>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: hook.attach_type(),
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    let mut out = Vec::new();
    for id in ids {
        let mut attr = GetFdByIdAttr { id, ..Default::default() };
        let fd = match sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
            Ok(r) => fd_from(r)?,
            // Gone between the query and now.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let name = info(&fd)?.name;
        let name = CStr::from_bytes_until_nul(&name).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(Attached { name, fd, hook });
    }
    Ok(out)
}

/// Opens a cgroup directory for attaching and querying.
pub fn open_cgroup(dir: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir)?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_linux_bpf_insn() {
        // r2 = *(u32 *)(r1 + 24): opcode 0x61, dst 2 in the low nibble, src 1 in the high one.
        assert_eq!(encode(&[load_u32(R2, R1, 24)]), [0x61, 0x12, 24, 0, 0, 0, 0, 0]);
        // *(u32 *)(r10 - 16) = 64
        assert_eq!(encode(&[store_imm_u32(R10, -16, 64)]), [0x62, 0x0a, 0xf0, 0xff, 64, 0, 0, 0]);
        // r1 = map fd 7: ld_imm64 with src = BPF_PSEUDO_MAP_FD, then an empty second slot.
        assert_eq!(encode(&load_map(R1, 7)), [0x18, 0x11, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn programs_build_the_key_the_maps_hold() {
        for hook in Hook::ALL {
            let p = program(hook, 3);
            let key = -(hook.key_len() as i16);
            // The full prefix length first: 16 bits of port, 16 of padding, the address.
            assert_eq!(p[1], store_imm_u32(R10, key, 32 + 8 * hook.address_len() as i32));
            assert_eq!(p[2], store_u16(R10, key + 4, R2));
            // Stack stores stay aligned to their width.
            for i in &p {
                if (0x61..=0x63).contains(&i.code) && i.regs & 0x0f == R10 {
                    assert_eq!(i.off % 4, 0, "{i:?}");
                }
            }
            // The lookup gets the key's address; a miss (r0 == 0) jumps to `return 1`.
            let n = p.len();
            assert_eq!(p[n - 5], jeq_imm(R0, 0, 2));
            assert_eq!((p[n - 2], p[n - 1]), (mov_imm(R0, 1), exit()));
            assert_eq!((p[n - 4], p[n - 3]), (mov_imm(R0, 0), exit()));
        }
        assert_eq!(program(Hook::Connect4, 3).len(), 16);
        assert_eq!(program(Hook::Connect6, 3).len(), 22);
        // bind() gives the same context (the local address asked for): the same program.
        assert_eq!(program(Hook::Bind4, 3), program(Hook::Connect4, 3));
        assert_eq!(program(Hook::Bind6, 3), program(Hook::Connect6, 3));
    }
}
