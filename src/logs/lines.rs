//! Turning a pipe's byte stream into log lines.

/// Splits one source's byte stream into lines. Pipes deliver arbitrary
/// chunks, so a partial line is held until its `'\n'` arrives; it is stamped
/// with the time its first byte was read, because that is when the task
/// produced it, not when the rest trickled in.
///
/// A line longer than `max_line` is cut into `max_line`-byte pieces so one
/// runaway line (a progress bar, a binary dump) cannot grow memory without
/// bound. Line endings are not normalised: a `'\r'` before the `'\n'` stays.
#[derive(Debug)]
pub struct LineAssembler {
    max_line: usize,
    /// The partial line; never longer than `max_line`.
    partial: Vec<u8>,
    /// When the first byte of `partial` was read.
    partial_ms: i64,
}

impl LineAssembler {
    /// `max_line` is the longest piece emitted; 0 is treated as 1.
    pub fn new(max_line: usize) -> LineAssembler {
        LineAssembler { max_line: max_line.max(1), partial: Vec::new(), partial_ms: 0 }
    }

    /// Feeds bytes read at `now_ms` and returns the lines they complete, each
    /// as (time its first byte was read, bytes without the `'\n'`). Each
    /// returned line is one exact-size allocation; the partial-line buffer is
    /// reused.
    pub fn push(&mut self, chunk: &[u8], now_ms: i64) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = chunk;
        while !rest.is_empty() {
            let room = self.max_line - self.partial.len();
            // A '\n' right after `room` bytes still ends a full-length line.
            let window = &rest[..rest.len().min(room.saturating_add(1))];
            if let Some(i) = window.iter().position(|&b| b == b'\n') {
                out.push(self.take_line(&rest[..i], now_ms));
                rest = &rest[i + 1..];
            } else if rest.len() > room {
                // A full piece followed by more of the same line.
                out.push(self.take_line(&rest[..room], now_ms));
                rest = &rest[room..];
            } else {
                if self.partial.is_empty() {
                    self.partial_ms = now_ms;
                }
                self.partial.extend_from_slice(rest);
                break;
            }
        }
        out
    }

    /// Emits the unterminated last line at end of stream, if any.
    pub fn flush(&mut self) -> Option<(i64, Vec<u8>)> {
        if self.partial.is_empty() {
            return None;
        }
        Some((self.partial_ms, std::mem::take(&mut self.partial)))
    }

    /// The held partial line followed by `tail`, which was read at `now_ms`.
    fn take_line(&mut self, tail: &[u8], now_ms: i64) -> (i64, Vec<u8>) {
        if self.partial.is_empty() {
            return (now_ms, tail.to_vec());
        }
        let mut line = Vec::with_capacity(self.partial.len() + tail.len());
        line.extend_from_slice(&self.partial);
        line.extend_from_slice(tail);
        self.partial.clear();
        (self.partial_ms, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(ts: i64, s: &str) -> (i64, Vec<u8>) {
        (ts, s.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines_within_one_chunk() {
        let mut a = LineAssembler::new(64);
        assert_eq!(a.push(b"a\nbb\n\nccc\r\n", 7), vec![l(7, "a"), l(7, "bb"), l(7, ""), l(7, "ccc\r")]);
        assert_eq!(a.flush(), None);
    }

    #[test]
    fn joins_line_split_across_chunks_with_first_byte_time() {
        let mut a = LineAssembler::new(64);
        assert!(a.push(b"hel", 10).is_empty());
        assert!(a.push(b"lo wo", 20).is_empty());
        assert_eq!(a.push(b"rld\nnext", 30), vec![l(10, "hello world")]);
        // "next" started at 30, not when its newline arrived.
        assert_eq!(a.push(b"\n", 40), vec![l(30, "next")]);
        assert!(a.push(b"", 50).is_empty());
        assert_eq!(a.flush(), None);
    }

    #[test]
    fn partial_line_started_by_newline_chunk_gets_its_own_time() {
        let mut a = LineAssembler::new(64);
        assert_eq!(a.push(b"x\n", 1), vec![l(1, "x")]);
        assert!(a.push(b"y", 2).is_empty());
        assert_eq!(a.push(b"\n", 3), vec![l(2, "y")]);
    }

    #[test]
    fn cuts_long_lines_into_max_line_pieces() {
        let mut a = LineAssembler::new(4);
        assert_eq!(a.push(b"abcdefghij\nxy\n", 1), vec![l(1, "abcd"), l(1, "efgh"), l(1, "ij"), l(1, "xy")]);
        // Exactly max_line then newline: one line, no empty piece after it.
        assert_eq!(a.push(b"abcd\n", 2), vec![l(2, "abcd")]);
        assert_eq!(a.push(b"abcdefgh\n", 3), vec![l(3, "abcd"), l(3, "efgh")]);
    }

    #[test]
    fn cuts_long_lines_across_chunks() {
        let mut a = LineAssembler::new(4);
        assert!(a.push(b"ab", 1).is_empty());
        assert!(a.push(b"cd", 2).is_empty(), "a full piece waits for the next byte");
        // The second piece's first byte arrives at 3.
        assert_eq!(a.push(b"ef", 3), vec![l(1, "abcd")]);
        assert_eq!(a.push(b"ghijk", 4), vec![l(3, "efgh")]);
        assert_eq!(a.push(b"\n", 5), vec![l(4, "ijk")]);
        assert!(a.push(b"abcd", 6).is_empty());
        assert_eq!(a.push(b"\n", 7), vec![l(6, "abcd")]);
    }

    #[test]
    fn flush_emits_unterminated_tail_once() {
        let mut a = LineAssembler::new(64);
        assert_eq!(a.push(b"done\npart", 5), vec![l(5, "done")]);
        assert!(a.push(b"ial", 6).is_empty());
        assert_eq!(a.flush(), Some(l(5, "partial")));
        assert_eq!(a.flush(), None);
        // Usable again after a flush.
        assert_eq!(a.push(b"z\n", 9), vec![l(9, "z")]);
    }

    #[test]
    fn zero_max_line_does_not_loop() {
        let mut a = LineAssembler::new(0);
        assert_eq!(a.push(b"ab\n", 1), vec![l(1, "a"), l(1, "b")]);
    }

    #[test]
    fn byte_at_a_time_matches_whole_chunk() {
        let input = b"one\r\ntwo\n\nthree is long\nfour";
        let mut whole = LineAssembler::new(5);
        let mut want = whole.push(input, 0);
        want.extend(whole.flush());
        let mut bytes = LineAssembler::new(5);
        let mut got = Vec::new();
        for b in input {
            got.extend(bytes.push(std::slice::from_ref(b), 0));
        }
        got.extend(bytes.flush());
        assert_eq!(got, want);
        let texts: Vec<_> = got.iter().map(|(_, d)| d.as_slice()).collect();
        assert_eq!(texts, vec![&b"one\r"[..], b"two", b"", b"three", b" is l", b"ong", b"four"]);
    }
}
