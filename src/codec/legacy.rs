//! A reader, and only a reader, of the encoding berth used before format 1:
//! bincode 1's default layout (fixed-width little-endian integers, u64
//! lengths, u32 enum variant indices, a one-byte Option tag). bincode is no
//! longer maintained (RUSTSEC-2025-0141), so it is not a dependency; this is
//! just enough of its layout to convert a data dir written by an older
//! release (see `meta::upgrade`). Nothing new is ever written in it.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// Why a legacy value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("legacy value ends early")]
    Eof,
    #[error("legacy value has {0} bytes after its end")]
    Trailing(usize),
    #[error("legacy value: {0}")]
    Malformed(String),
}

impl de::Error for LegacyError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        LegacyError::Malformed(msg.to_string())
    }
}

/// Decode one value written by `bincode::serialize` (bincode 1.3).
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, LegacyError> {
    let mut d = Deserializer { input: bytes };
    let v = T::deserialize(&mut d)?;
    if !d.input.is_empty() {
        return Err(LegacyError::Trailing(d.input.len()));
    }
    Ok(v)
}

struct Deserializer<'de> {
    input: &'de [u8],
}

impl<'de> Deserializer<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8], LegacyError> {
        if self.input.len() < n {
            return Err(LegacyError::Eof);
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LegacyError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn len(&mut self) -> Result<usize, LegacyError> {
        let n = u64::from_le_bytes(self.array()?);
        // Every element of berth's types takes at least a byte, so a length
        // beyond what is left is corrupt (and never drives a long loop).
        usize::try_from(n).ok().filter(|n| *n <= self.input.len()).ok_or(LegacyError::Eof)
    }

    fn bytes(&mut self) -> Result<&'de [u8], LegacyError> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'de str, LegacyError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| LegacyError::Malformed(e.to_string()))
    }
}

macro_rules! ints {
    ($($method:ident $visit:ident $t:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
            v.$visit(<$t>::from_le_bytes(self.array()?))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de> {
    type Error = LegacyError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, LegacyError> {
        Err(LegacyError::Malformed("the legacy layout does not describe itself".into()))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        match self.take(1)?[0] {
            0 => v.visit_bool(false),
            1 => v.visit_bool(true),
            b => Err(LegacyError::Malformed(format!("bool {b}"))),
        }
    }

    ints! {
        deserialize_u8 visit_u8 u8;
        deserialize_u16 visit_u16 u16;
        deserialize_u32 visit_u32 u32;
        deserialize_u64 visit_u64 u64;
        deserialize_u128 visit_u128 u128;
        deserialize_i8 visit_i8 i8;
        deserialize_i16 visit_i16 i16;
        deserialize_i32 visit_i32 i32;
        deserialize_i64 visit_i64 i64;
        deserialize_i128 visit_i128 i128;
        deserialize_f32 visit_f32 f32;
        deserialize_f64 visit_f64 f64;
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        // UTF-8, one to four bytes, the length told by the first.
        let first = *self.input.first().ok_or(LegacyError::Eof)?;
        let n = match first {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        };
        let s = std::str::from_utf8(self.take(n)?).map_err(|e| LegacyError::Malformed(e.to_string()))?;
        v.visit_char(s.chars().next().ok_or(LegacyError::Eof)?)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        v.visit_borrowed_str(self.str()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        v.visit_borrowed_str(self.str()?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        v.visit_borrowed_bytes(self.bytes()?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        v.visit_borrowed_bytes(self.bytes()?)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        match self.take(1)?[0] {
            0 => v.visit_none(),
            1 => v.visit_some(self),
            b => Err(LegacyError::Malformed(format!("option tag {b}"))),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, LegacyError> {
        v.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, LegacyError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        let n = self.len()?;
        v.visit_seq(Counted { de: self, left: n })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, n: usize, v: V) -> Result<V::Value, LegacyError> {
        v.visit_seq(Counted { de: self, left: n })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        n: usize,
        v: V,
    ) -> Result<V::Value, LegacyError> {
        v.visit_seq(Counted { de: self, left: n })
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LegacyError> {
        let n = self.len()?;
        v.visit_map(Counted { de: self, left: n })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, LegacyError> {
        v.visit_seq(Counted { de: self, left: fields.len() })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, LegacyError> {
        v.visit_enum(self)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value, LegacyError> {
        Err(LegacyError::Malformed("the legacy layout has no identifiers".into()))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, LegacyError> {
        Err(LegacyError::Malformed("the legacy layout cannot skip a value".into()))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// A sequence, tuple, struct or map of a known number of elements.
struct Counted<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Counted<'_, 'de> {
    type Error = LegacyError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, LegacyError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // Never trust a stored length for a preallocation.
        Some(self.left.min(4096))
    }
}

impl<'de> de::MapAccess<'de> for Counted<'_, 'de> {
    type Error = LegacyError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, LegacyError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, LegacyError> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left.min(4096))
    }
}

impl<'de> de::EnumAccess<'de> for &mut Deserializer<'de> {
    type Error = LegacyError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), LegacyError> {
        let index = u32::from_le_bytes(self.array()?);
        let v = seed.deserialize::<de::value::U32Deserializer<LegacyError>>(index.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Deserializer<'de> {
    type Error = LegacyError;

    fn unit_variant(self) -> Result<(), LegacyError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, LegacyError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, n: usize, v: V) -> Result<V::Value, LegacyError> {
        v.visit_seq(Counted { de: self, left: n })
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, LegacyError> {
        v.visit_seq(Counted { de: self, left: fields.len() })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    enum Shape {
        Unit,
        New(u16),
        Pair(u8, bool),
        Named { s: String, o: Option<u32> },
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Outer {
        a: u64,
        shapes: Vec<Shape>,
        map: std::collections::BTreeMap<String, i32>,
        bytes: serde_bytes::ByteBuf,
        none: Option<u8>,
        tuple: (u8, char),
    }

    /// Bytes laid out by hand as bincode 1 lays them out.
    #[test]
    fn reads_bincode_1_layout() {
        let mut b = Vec::new();
        b.extend(7u64.to_le_bytes());
        b.extend(4u64.to_le_bytes()); // four shapes
        b.extend(0u32.to_le_bytes()); // Unit
        b.extend(1u32.to_le_bytes()); // New(300)
        b.extend(300u16.to_le_bytes());
        b.extend(2u32.to_le_bytes()); // Pair(9, true)
        b.extend([9, 1]);
        b.extend(3u32.to_le_bytes()); // Named { "hé", Some(5) }
        b.extend(3u64.to_le_bytes());
        b.extend("hé".as_bytes());
        b.push(1);
        b.extend(5u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // map of one
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend((-2i32).to_le_bytes());
        b.extend(2u64.to_le_bytes()); // bytes
        b.extend([0xff, 0]);
        b.push(0); // None
        b.push(4);
        b.extend("é".as_bytes());
        let v: Outer = from_bytes(&b).unwrap();
        assert_eq!(
            v,
            Outer {
                a: 7,
                shapes: vec![
                    Shape::Unit,
                    Shape::New(300),
                    Shape::Pair(9, true),
                    Shape::Named { s: "hé".into(), o: Some(5) }
                ],
                map: [("k".to_string(), -2)].into_iter().collect(),
                bytes: serde_bytes::ByteBuf::from(vec![0xff, 0]),
                none: None,
                tuple: (4, 'é'),
            }
        );
        // Cut anywhere, or with a byte more, it is refused, never misread.
        for cut in 0..b.len() {
            assert!(from_bytes::<Outer>(&b[..cut]).is_err(), "cut at {cut}");
        }
        b.push(0);
        assert!(matches!(from_bytes::<Outer>(&b), Err(LegacyError::Trailing(1))));
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let mut b = Vec::new();
        b.extend(u64::MAX.to_le_bytes());
        assert!(from_bytes::<Vec<u64>>(&b).is_err());
        assert!(from_bytes::<String>(&b).is_err());
    }
}
