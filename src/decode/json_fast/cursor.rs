//! The cursor over one record's bytes: strict JSON tokens, strings, numbers, skipping.

use super::*;

/// The bytes that end a string's plain run: `"`, `\\` and the control characters.
pub(super) static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// A cursor over one record's text (valid UTF-8, checked once).
pub(super) struct Cur<'a> {
    pub(super) s: &'a str,
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

impl<'a> Cur<'a> {
    #[inline]
    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// After a member or element: `Some(true)` past the `close` byte, `Some(false)` past a comma
    /// (and the whitespace after it), `None` on anything else.
    #[inline]
    pub(super) fn closed(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        if c == close {
            return Some(true);
        }
        (c == b',').then(|| self.ws())?;
        Some(false)
    }

    #[inline]
    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    pub(super) fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    pub(super) fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..]
            .starts_with(word)
            .then(|| self.i += word.len())
    }

    /// The members of an object whose `{` was just read, into `cols` (one per node).
    /// `order` is the fields' order in the previous object of this shape (an index per member,
    /// `usize::MAX` for one not in the schema), updated as members are found elsewhere.
    pub(super) fn object(
        &mut self,
        nodes: &[Node],
        cols: &mut [Col],
        order: &mut Vec<usize>,
        scratch: &mut String,
        depth: u32,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut seen = 0u64;
        self.ws();
        if self.eat(b'}').is_none() {
            let mut member = 0;
            loop {
                self.eat(b'"')?;
                let key = self.key()?;
                self.ws();
                self.eat(b':')?;
                self.ws();
                // The field at this position in the previous object is tried first.
                let hint = order.get(member).copied().unwrap_or(usize::MAX);
                let found = if nodes.get(hint).is_some_and(|n| same(&n.name, key)) {
                    Some(hint)
                } else {
                    let k = nodes.iter().position(|n| same(&n.name, key));
                    match order.get_mut(member) {
                        Some(o) => *o = k.unwrap_or(usize::MAX),
                        None => order.push(k.unwrap_or(usize::MAX)),
                    }
                    k
                };
                member += 1;
                match found {
                    Some(k) => {
                        if seen & (1 << k) != 0 {
                            // arrow-json keeps the last; rare enough to leave to it.
                            return None;
                        }
                        seen |= 1 << k;
                        self.value(&nodes[k], &mut cols[k], scratch, depth)?;
                    }
                    None => self.skip(scratch, depth)?,
                }
                if self.closed(b'}')? {
                    break;
                }
            }
        }
        let all = if nodes.len() == 64 {
            u64::MAX
        } else {
            (1u64 << nodes.len()) - 1
        };
        if seen != all {
            for (k, (n, c)) in nodes.iter().zip(cols.iter_mut()).enumerate() {
                if seen & (1 << k) == 0 {
                    if !n.nullable {
                        return None;
                    }
                    c.null();
                }
            }
        }
        Some(())
    }

    pub(super) fn value(
        &mut self,
        node: &Node,
        col: &mut Col,
        scratch: &mut String,
        depth: u32,
    ) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                let s = self.string(scratch)?;
                col.string(&node.kind, s)
            }
            b'-' | b'0'..=b'9' => {
                let (text, int) = self.number()?;
                col.number(&node.kind, text, int)
            }
            b'n' => {
                self.literal(b"null")?;
                if !node.nullable {
                    return None;
                }
                col.null();
                Some(())
            }
            b't' => {
                self.literal(b"true")?;
                col.boolean(true)
            }
            b'f' => {
                self.literal(b"false")?;
                col.boolean(false)
            }
            b'{' => match (col, &node.kind) {
                (Col::Struct(children, nulls, order), Kind::Struct(nodes)) => {
                    self.i += 1;
                    self.object(nodes, children, order, scratch, depth + 1)?;
                    nulls.append_non_null();
                    Some(())
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// An object key after its opening quote; keys with escapes are left to arrow-json.
    pub(super) fn key(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        self.plain();
        self.eat(b'"')?;
        Some(&self.b[start..self.i - 1])
    }

    /// Moves past the plain bytes of a string: those that are not `"`, `\\` or a control
    /// character.
    /// Eight bytes at a time while eight remain (a word test per step), then byte by byte.
    #[inline]
    pub(super) fn plain(&mut self) {
        const ONES: u64 = u64::from_le_bytes([0x01; 8]);
        const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            // The classic zero-byte tests: the lowest flagged byte is exact (higher ones may be
            // false positives, which do not matter). Bytes >= 0x80 are never flagged.
            let quote = w ^ (ONES * u64::from(b'"'));
            let backslash = w ^ (ONES * u64::from(b'\\'));
            let special = (w.wrapping_sub(ONES * 0x20)
                | quote.wrapping_sub(ONES)
                | backslash.wrapping_sub(ONES))
                & !w
                & HIGH;
            // `!w` above is exact for the control-character test; for `"` and `\\` the zero
            // test needs `!quote` / `!backslash`, which `!w` implies for bytes below 0x80.
            if special != 0 {
                let found = self.i + (special.trailing_zeros() / 8) as usize;
                // The word test is a filter; the table decides.
                match self.b[self.i..=found]
                    .iter()
                    .position(|&c| SPECIAL[c as usize])
                {
                    Some(k) => {
                        self.i += k;
                        return;
                    }
                    None => self.i = found + 1,
                }
                continue;
            }
            self.i += 8;
        }
        let rest = &self.b[self.i..];
        self.i += rest
            .iter()
            .position(|&c| SPECIAL[c as usize])
            .unwrap_or(rest.len());
    }

    /// A string after its opening quote, unescaped (into `scratch` when it has escapes).
    pub(super) fn string<'s>(&mut self, scratch: &'s mut String) -> Option<&'s str>
    where
        'a: 's,
    {
        let start = self.i;
        self.plain();
        match self.peek()? {
            b'"' => {
                self.i += 1;
                return self.s.get(start..self.i - 1);
            }
            b'\\' => {}
            _ => return None,
        }
        scratch.clear();
        scratch.push_str(self.s.get(start..self.i)?);
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(scratch.as_str());
                }
                b'\\' => {
                    self.i += 1;
                    let c = self.escape()?;
                    scratch.push(c);
                }
                0..=0x1f => return None,
                _ => {
                    let run = self.i;
                    self.plain();
                    scratch.push_str(self.s.get(run..self.i)?);
                }
            }
        }
    }

    /// An escape after its backslash, as arrow-json reads it: the JSON escapes, and `\u` with
    /// UTF-16 surrogate pairs.
    pub(super) fn escape(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        Some(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4()?;
                if let Some(c) = char::from_u32(high) {
                    return Some(c);
                }
                self.eat(b'\\')?;
                self.eat(b'u')?;
                let low = self.hex4()?;
                if !(0xD800..=0xDBFF).contains(&high) || !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                char::from_u32((((high - 0xD800) << 10) | (low - 0xDC00)) + 0x1_0000)?
            }
            _ => return None,
        })
    }

    pub(super) fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.i..self.i + 4)?;
        let mut v = 0;
        for &d in digits {
            v = (v << 4) | char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// A number in strict JSON syntax: its text, and whether it is an integer.
    pub(super) fn number(&mut self) -> Option<(&'a str, bool)> {
        let start = self.i;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut int = true;
        if self.eat(b'.').is_some() {
            int = false;
            self.digits1()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            int = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits1()?;
        }
        Some((self.s.get(start..self.i)?, int))
    }

    pub(super) fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    pub(super) fn digits1(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    /// Reads past one value of a field not in the schema, checking it is valid JSON.
    pub(super) fn skip(&mut self, scratch: &mut String, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string(scratch).map(drop)
            }
            b'-' | b'0'..=b'9' => self.number().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'{' => {
                self.i += 1;
                self.ws();
                if self.eat(b'}').is_some() {
                    return Some(());
                }
                loop {
                    self.eat(b'"')?;
                    self.string(scratch)?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.skip(scratch, depth + 1)?;
                    if self.closed(b'}')? {
                        return Some(());
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.skip(scratch, depth + 1)?;
                    if self.closed(b']')? {
                        return Some(());
                    }
                }
            }
            _ => None,
        }
    }
}
