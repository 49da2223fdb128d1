//! Tiny static x86-64 programs for the syscalls busybox and coreutils have no applet for
//! (keyctl, mount, clone3), to see from inside a task what its seccomp filter answers.

/// A static x86-64 ELF that makes syscall `nr` with the arguments (0, -1, 0, 0, 0) and exits
/// with the negated result: the errno when the call failed.
pub fn syscall_probe(nr: u32) -> Vec<u8> {
    let mut code = vec![0xb8]; // mov eax, nr
    code.extend_from_slice(&nr.to_le_bytes());
    code.extend_from_slice(&[
        0x31, 0xff, // xor edi, edi
        0xbe, 0xff, 0xff, 0xff, 0xff, // mov esi, -1
        0x31, 0xd2, // xor edx, edx
        0x4d, 0x31, 0xd2, // xor r10, r10
        0x4d, 0x31, 0xc0, // xor r8, r8
        0x0f, 0x05, // syscall
        0xf7, 0xd8, // neg eax
        0x89, 0xc7, // mov edi, eax
        0xb8, 60, 0, 0, 0, // mov eax, 60 (exit)
        0x0f, 0x05, // syscall
    ]);
    static_elf(&code)
}

/// An ELF whose one loadable segment is the header followed by `code`, entered at `code`.
fn static_elf(code: &[u8]) -> Vec<u8> {
    let base: u64 = 0x400000;
    let size = (64 + 56 + code.len()) as u64;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(base + 64 + 56).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&0u64.to_le_bytes());
    for v in [base, base, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}
