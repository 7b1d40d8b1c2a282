//! A compact set of chunk indices: which chunks of a blob a node holds. It travels on the wire,
//! so decoding checks the length against the layout and refuses stray bits.

use crate::blob::MAX_CHUNKS;
use serde::{Deserialize, Serialize};

/// One bit per chunk, most significant bit first within each byte (chunk 0 is `0x80` of byte 0),
/// as BitTorrent's bitfield, so a hex dump reads left to right.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "BitfieldWire", into = "BitfieldWire")]
pub struct Bitfield {
    len: u32,
    bits: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    #[error("bitfield of {len} bits is over the {MAX_CHUNKS}-chunk limit")]
    TooLong { len: u32 },
    #[error("bitfield of {len} bits needs {expected} bytes, got {got}")]
    WrongByteCount {
        len: u32,
        expected: usize,
        got: usize,
    },
    #[error("bitfield of {len} bits has bits set past its end")]
    StrayBits { len: u32 },
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Result<Self, BitfieldError> {
        if len > MAX_CHUNKS {
            return Err(BitfieldError::TooLong { len });
        }
        Ok(Bitfield {
            len,
            bits: vec![0; byte_count(len)],
        })
    }

    /// Every chunk held.
    pub fn full(len: u32) -> Result<Self, BitfieldError> {
        let mut field = Self::new(len)?;
        field.bits.iter_mut().for_each(|b| *b = 0xff);
        field.clear_spare_bits();
        Ok(field)
    }

    /// Decodes the packed form, checking it is exactly as long as `len` bits need and that the
    /// padding bits of the last byte are zero (so every set has one encoding).
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, BitfieldError> {
        if len > MAX_CHUNKS {
            return Err(BitfieldError::TooLong { len });
        }
        let expected = byte_count(len);
        if bytes.len() != expected {
            return Err(BitfieldError::WrongByteCount {
                len,
                expected,
                got: bytes.len(),
            });
        }
        let field = Bitfield {
            len,
            bits: bytes.to_vec(),
        };
        if field.spare_bits_set() {
            return Err(BitfieldError::StrayBits { len });
        }
        Ok(field)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.clone()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// The number of chunks the set ranges over (not the number held).
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether chunk `index` is in the set; out of range is simply "no".
    pub fn get(&self, index: u32) -> bool {
        index < self.len && self.bits[(index / 8) as usize] & mask(index) != 0
    }

    /// Sets or clears chunk `index`; out of range is ignored and reported as `false`.
    pub fn set(&mut self, index: u32, value: bool) -> bool {
        if index >= self.len {
            return false;
        }
        let byte = &mut self.bits[(index / 8) as usize];
        if value {
            *byte |= mask(index);
        } else {
            *byte &= !mask(index);
        }
        true
    }

    pub fn count_ones(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// The held chunk indices in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte != 0)
            .flat_map(|(at, byte)| {
                (0..8u32)
                    .filter(move |bit| byte & (0x80 >> bit) != 0)
                    .map(move |bit| at as u32 * 8 + bit)
            })
    }

    fn spare_bits_set(&self) -> bool {
        let used = self.len % 8;
        used != 0
            && self
                .bits
                .last()
                .is_some_and(|last| last & (0xff >> used) != 0)
    }

    fn clear_spare_bits(&mut self) {
        let used = self.len % 8;
        if used != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= !(0xff >> used);
            }
        }
    }
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bitfield({}/{}: {})",
            self.count_ones(),
            self.len,
            hex::encode(&self.bits)
        )
    }
}

fn byte_count(len: u32) -> usize {
    len.div_ceil(8) as usize
}

fn mask(index: u32) -> u8 {
    0x80 >> (index % 8)
}

/// The serialized shape; decoding goes through [`Bitfield::from_bytes`] so a hostile peer cannot
/// hand over a set whose length and bytes disagree.
#[derive(Serialize, Deserialize)]
struct BitfieldWire {
    len: u32,
    bits: Vec<u8>,
}

impl TryFrom<BitfieldWire> for Bitfield {
    type Error = BitfieldError;

    fn try_from(wire: BitfieldWire) -> Result<Self, BitfieldError> {
        Bitfield::from_bytes(wire.len, &wire.bits)
    }
}

impl From<Bitfield> for BitfieldWire {
    fn from(field: Bitfield) -> Self {
        BitfieldWire {
            len: field.len,
            bits: field.bits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bits_are_msb_first_and_spare_bits_are_refused() {
        let mut field = Bitfield::new(10).unwrap();
        assert!(field.set(0, true));
        assert!(field.set(9, true));
        assert!(!field.set(10, true));
        assert_eq!(field.to_bytes(), vec![0x80, 0x40]);
        assert_eq!(field.iter_ones().collect::<Vec<_>>(), vec![0, 9]);
        assert_eq!(field.count_ones(), 2);
        assert!(!field.get(10));
        assert!(matches!(
            Bitfield::from_bytes(10, &[0x80, 0x20]),
            Err(BitfieldError::StrayBits { .. })
        ));
        assert!(matches!(
            Bitfield::from_bytes(10, &[0x80]),
            Err(BitfieldError::WrongByteCount {
                expected: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            Bitfield::new(MAX_CHUNKS + 1),
            Err(BitfieldError::TooLong { .. })
        ));
        let full = Bitfield::full(10).unwrap();
        assert!(full.is_full());
        assert_eq!(full.to_bytes(), vec![0xff, 0xc0]);
        assert_eq!(Bitfield::new(0).unwrap().to_bytes(), Vec::<u8>::new());
    }

    #[test]
    fn serde_goes_through_the_length_check() {
        let mut field = Bitfield::new(3).unwrap();
        field.set(2, true);
        let json = serde_json::to_string(&field).unwrap();
        assert_eq!(serde_json::from_str::<Bitfield>(&json).unwrap(), field);
        assert!(serde_json::from_str::<Bitfield>(r#"{"len":3,"bits":[1]}"#).is_err());
        assert!(serde_json::from_str::<Bitfield>(r#"{"len":30,"bits":[0]}"#).is_err());
    }

    proptest! {
        #[test]
        fn round_trips_and_agrees_with_a_plain_set(
            len in 0u32..300,
            picks in proptest::collection::vec(any::<u32>(), 0..64),
        ) {
            let mut field = Bitfield::new(len).unwrap();
            let mut model = std::collections::BTreeSet::new();
            for pick in picks {
                if len == 0 { break; }
                let index = pick % len;
                let value = pick & 0x8000_0000 == 0;
                field.set(index, value);
                if value { model.insert(index); } else { model.remove(&index); }
            }
            prop_assert_eq!(field.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(field.count_ones() as usize, model.len());
            let again = Bitfield::from_bytes(len, &field.to_bytes()).unwrap();
            prop_assert_eq!(again, field);
        }
    }
}
