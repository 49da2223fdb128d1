//! Where an archive's entry may land: the one check of the paths the worker is given inside a
//! directory it writes or reads — a bundle's zip entries ([`crate::bundle`]), an image layer's
//! tar entries (`env::image::unpack`), a Dockerfile's path inside its BuildKit context
//! ([`crate::buildkit`]). Such a path stays below its directory: no absolute path, no `..`
//! component, no NUL byte.
//!
//! Symlinks are each format's own concern, on top of this check: a bundle's are resolved and
//! checked before anything is written and nothing is placed below one; an image layer may hold
//! any symlink (it is a root filesystem) but nothing is written through one; BuildKit's `tar`
//! export goes through the `tar` crate's `unpack_in`, which refuses the same paths and never
//! writes through a symlink out of the root.

#![warn(missing_docs)]

use std::fmt;

/// Why an entry's path may not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPathError {
    /// It starts at a root (`/`; with backslashes also `\` or a drive letter `C:`).
    Absolute,
    /// A component is `..`.
    ParentDir,
    /// It contains a NUL byte (no file name can).
    Nul,
}

impl EntryPathError {
    /// What is wrong, for an error message.
    pub fn reason(self) -> &'static str {
        match self {
            EntryPathError::Absolute => "absolute path",
            EntryPathError::ParentDir => "path contains '..'",
            EntryPathError::Nul => "path contains a NUL byte",
        }
    }
}

impl fmt::Display for EntryPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// What separates the components of an entry's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Separators {
    /// `/` only (tar, paths on this host: `\` is an ordinary character of a name).
    Slash,
    /// `/` and `\`: zip archives made on Windows use `\`.
    SlashOrBackslash,
}

/// The components of `path` below the directory it is relative to, `.` and empty components
/// left out (so the directory itself has none), after refusing an absolute path, a `..`
/// component and a NUL byte.
pub fn entry_parts(path: &[u8], separators: Separators) -> Result<Vec<&[u8]>, EntryPathError> {
    if path.contains(&0) {
        return Err(EntryPathError::Nul);
    }
    let backslash = separators == Separators::SlashOrBackslash;
    let drive = backslash && path.len() >= 2 && path[0].is_ascii_alphabetic() && path[1] == b':';
    if path.first() == Some(&b'/') || (backslash && path.first() == Some(&b'\\')) || drive {
        return Err(EntryPathError::Absolute);
    }
    let mut parts = Vec::new();
    for part in path.split(|&b| b == b'/' || (backslash && b == b'\\')) {
        match part {
            b"" | b"." => {}
            b".." => return Err(EntryPathError::ParentDir),
            part => parts.push(part),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(path: &str, separators: Separators) -> Result<Vec<&str>, EntryPathError> {
        entry_parts(path.as_bytes(), separators)
            .map(|p| p.into_iter().map(|c| std::str::from_utf8(c).unwrap()).collect())
    }

    #[test]
    fn paths_split_into_their_normal_components() {
        use Separators::*;
        assert_eq!(parts("a/b/c.py", Slash).unwrap(), ["a", "b", "c.py"]);
        assert_eq!(parts("./a//b/./", Slash).unwrap(), ["a", "b"]);
        assert_eq!(parts("..a/b..", Slash).unwrap(), ["..a", "b.."]);
        assert!(parts("", Slash).unwrap().is_empty() && parts("./", Slash).unwrap().is_empty());
        assert_eq!(parts("a\\b", Slash).unwrap(), ["a\\b"]);
        assert_eq!(parts("a\\b", SlashOrBackslash).unwrap(), ["a", "b"]);
    }

    #[test]
    fn paths_out_of_the_directory_are_refused() {
        use Separators::*;
        assert_eq!(parts("/etc/passwd", Slash), Err(EntryPathError::Absolute));
        assert_eq!(parts("\\x", SlashOrBackslash), Err(EntryPathError::Absolute));
        assert_eq!(parts("C:/x", SlashOrBackslash), Err(EntryPathError::Absolute));
        assert_eq!(parts("C:/x", Slash).unwrap(), ["C:", "x"]);
        assert_eq!(parts("a/../../x", Slash), Err(EntryPathError::ParentDir));
        assert_eq!(parts("a/..", Slash), Err(EntryPathError::ParentDir));
        assert_eq!(parts("a\\..\\x", SlashOrBackslash), Err(EntryPathError::ParentDir));
        assert_eq!(parts("a\\..\\x", Slash).unwrap(), ["a\\..\\x"]);
        assert_eq!(parts("a\0b", Slash), Err(EntryPathError::Nul));
    }
}
