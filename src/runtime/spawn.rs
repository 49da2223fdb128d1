//! `posix_spawn`: how a process is started here without a `fork` — the worker starting a
//! supervisor, and a container's init starting the task's command.
//!
//! glibc's `posix_spawn` is a `CLONE_VM | CLONE_VFORK` child that execs at once. A `fork`
//! copies the parent's page tables only for the exec to drop them: tens of MB mapped in the
//! worker, the supervisor's whole image in a container's init (docs/ARCHITECTURE.md,
//! Performance). Every child starts with the signal state `std::process::Command` leaves: no
//! signal blocked (a blocked mask survives exec) and SIGPIPE at its default (Rust ignores it,
//! and an ignored signal survives exec too).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

/// One child to start: its file actions and attributes, released on drop.
pub(crate) struct Spawn {
    actions: Box<libc::posix_spawn_file_actions_t>,
    attr: Box<libc::posix_spawnattr_t>,
    flags: libc::c_int,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) }
}

/// `bytes` as a C string; a NUL byte in it is invalid input.
pub(crate) fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// `NAME=value` entries for an environment.
pub(crate) fn env_entries<'a>(
    vars: impl IntoIterator<Item = (&'a std::ffi::OsStr, &'a std::ffi::OsStr)>,
) -> io::Result<Vec<CString>> {
    vars.into_iter().map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat())).collect()
}

/// A NULL-terminated array of the strings' pointers, valid as long as `strings` is.
fn pointers(strings: &[CString]) -> Vec<*mut libc::c_char> {
    // The C signature takes `char *const[]`; posix_spawn never writes through them.
    strings.iter().map(|s| s.as_ptr().cast_mut()).chain(std::iter::once(std::ptr::null_mut())).collect()
}

impl Spawn {
    /// A child with the signal state above, its descriptors as this process's (less the
    /// close-on-exec ones) unless actions say otherwise.
    pub(crate) fn new() -> io::Result<Spawn> {
        // SAFETY: both objects are plain data that the init calls fill in; each is destroyed
        // once, in Drop, and only after its init succeeded (a failed one is never wrapped).
        unsafe {
            let mut actions: Box<libc::posix_spawn_file_actions_t> = Box::new(std::mem::zeroed());
            check(libc::posix_spawn_file_actions_init(&mut *actions))?;
            let mut attr: Box<libc::posix_spawnattr_t> = Box::new(std::mem::zeroed());
            if let Err(e) = check(libc::posix_spawnattr_init(&mut *attr)) {
                libc::posix_spawn_file_actions_destroy(&mut *actions);
                return Err(e);
            }
            let mut spawn = Spawn { actions, attr, flags: libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF };
            let mut empty: libc::sigset_t = std::mem::zeroed();
            let mut sigpipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigemptyset(&mut sigpipe);
            libc::sigaddset(&mut sigpipe, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut *spawn.attr, &empty))?;
            check(libc::posix_spawnattr_setsigdefault(&mut *spawn.attr, &sigpipe))?;
            Ok(spawn)
        }
    }

    /// The child gets a session of its own.
    pub(crate) fn new_session(&mut self) -> &mut Spawn {
        self.flags |= libc::c_int::from(libc::POSIX_SPAWN_SETSID);
        self
    }

    /// `fd` is closed in the child.
    pub(crate) fn close(&mut self, fd: RawFd) -> io::Result<&mut Spawn> {
        // SAFETY: an initialised actions object of ours.
        check(unsafe { libc::posix_spawn_file_actions_addclose(&mut *self.actions, fd) })?;
        Ok(self)
    }

    /// `fd` is duplicated onto `to` in the child (if they are equal, the close-on-exec flag
    /// stays: move `fd` elsewhere first).
    pub(crate) fn dup2(&mut self, fd: RawFd, to: RawFd) -> io::Result<&mut Spawn> {
        // SAFETY: an initialised actions object of ours.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut *self.actions, fd, to) })?;
        Ok(self)
    }

    /// `path` is opened at `fd` in the child with `flags`.
    pub(crate) fn open(&mut self, fd: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<&mut Spawn> {
        // SAFETY: an initialised actions object of ours; glibc copies `path`.
        check(unsafe { libc::posix_spawn_file_actions_addopen(&mut *self.actions, fd, path.as_ptr(), flags, 0) })?;
        Ok(self)
    }

    /// Starts `program` with `argv` (its first is the name the program sees) and only `envp`;
    /// `search_path`: a `program` without a slash is looked for on this process's `PATH`, as
    /// `execvp` does (though a file without `#!` is never handed to /bin/sh). Returns the
    /// child's pid, for the caller to reap; an error is the clone's or the exec's errno.
    pub(crate) fn spawn(
        &mut self,
        program: &CStr,
        argv: &[CString],
        envp: &[CString],
        search_path: bool,
    ) -> io::Result<libc::pid_t> {
        let flags = libc::c_short::try_from(self.flags).map_err(|_| io::Error::other("posix_spawn flags"))?;
        // SAFETY: an initialised attribute object of ours.
        check(unsafe { libc::posix_spawnattr_setflags(&mut *self.attr, flags) })?;
        let (argv, envp) = (pointers(argv), pointers(envp));
        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer (program, argv, envp and their strings, actions, attr) is live
        // for the call; the child execs or exits before it returns.
        let rc = unsafe {
            let spawn = if search_path { libc::posix_spawnp } else { libc::posix_spawn };
            spawn(&mut pid, program.as_ptr(), &*self.actions, &*self.attr, argv.as_ptr(), envp.as_ptr())
        };
        check(rc).map(|()| pid)
    }
}

impl Drop for Spawn {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new` and are destroyed only here.
        unsafe {
            libc::posix_spawnattr_destroy(&mut *self.attr);
            libc::posix_spawn_file_actions_destroy(&mut *self.actions);
        }
    }
}
