//! The metadata of a GGUF file (versions 2 and 3, little-endian): header, key/value pairs and
//! the names of the tensors, never the tensor data. Format: ggml `docs/gguf.md`. candle has a
//! full parser, but it comes with all of candle; a router needs only this.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::{Error, Result};

// Bounds against hostile files, far above real ones (the longest strings are chat templates
// of tens of KiB, the longest arrays vocabularies and merges of a few 100k entries), so that
// a bad length is an error and never a huge allocation.
const MAX_KV: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 16;
const MAX_STRING_BYTES: u64 = 1 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 21;
/// Values in all arrays of a file together.
const MAX_VALUES: u64 = 1 << 22;
const MAX_DEPTH: usize = 4;
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::I8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any integer that fits a u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_i64().and_then(|v| u32::try_from(v).ok())
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// What a GGUF file says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// The tensors the file holds, by name (their shapes, types and data are not read).
    pub tensor_names: HashSet<String>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Gguf(reason.into())
}

impl Gguf {
    /// Reads the metadata of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::read(&mut BufReader::new(file)).map_err(|e| e.in_file(path))
    }

    /// Reads from the start of a GGUF file up to the end of its tensor infos.
    pub fn read(r: &mut impl Read) -> Result<Self> {
        let mut r = Reader { r, values: 0 };
        let mut magic = [0; 4];
        r.bytes(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(bad(format!("not a GGUF file (magic {magic:02x?})")));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensors = r.count("tensors", MAX_TENSORS)?;
        let kvs = r.count("metadata entries", MAX_KV)?;
        let mut metadata = HashMap::new();
        for _ in 0..kvs {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| match e {
                Error::Gguf(reason) => bad(format!("{key}: {reason}")),
                e => e,
            })?;
            metadata.insert(key, value);
        }
        let mut tensor_names = HashSet::new();
        for _ in 0..tensors {
            let name = r.string()?;
            let dims = r.u32()?;
            if dims > MAX_DIMS {
                return Err(bad(format!("tensor {name} has {dims} dimensions, at most {MAX_DIMS} are allowed")));
            }
            // The dimensions, then the element type (u32) and the data offset (u64).
            let mut skip = [0; 8 * MAX_DIMS as usize + 12];
            r.bytes(&mut skip[..8 * dims as usize + 12])?;
            tensor_names.insert(name);
        }
        Ok(Self { version, metadata, tensor_names })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A value that must be there.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| bad(format!("missing metadata {key}")))
    }
}

/// A reader that counts the array values it has read.
struct Reader<'a, R> {
    r: &'a mut R,
    values: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("truncated: the file ends inside its metadata"),
            _ => bad(e.to_string()),
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0; N];
        self.bytes(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, what: &str, max: u64) -> Result<u64> {
        let n = self.u64()?;
        if n > max {
            return Err(bad(format!("{n} {what}, at most {max} are allowed")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES {
            return Err(bad(format!("a string of {len} bytes, at most {MAX_STRING_BYTES} are allowed")));
        }
        // Grows with what the file holds, not with what it claims.
        let mut buf = Vec::new();
        self.r.take(len).read_to_end(&mut buf).map_err(|e| bad(e.to_string()))?;
        if buf.len() as u64 != len {
            return Err(bad("truncated: the file ends inside its metadata"));
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("bool byte {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(bad(format!("arrays nested deeper than {MAX_DEPTH}")));
                }
                let ty = self.u32()?;
                let len = self.count("array elements", MAX_ARRAY_LEN)?;
                self.values += len;
                if self.values > MAX_VALUES {
                    return Err(bad(format!("more than {MAX_VALUES} array elements in all")));
                }
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(self.value(ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(bad(format!("unknown value type {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF bytes the way a writer would.
    struct Writer(Vec<u8>);

    impl Writer {
        fn header(version: u32, tensors: u64, kvs: u64) -> Self {
            let mut w = Self(b"GGUF".to_vec());
            w.u32(version).u64(tensors).u64(kvs);
            w
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend(s.as_bytes());
            self
        }
        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend(b);
            self
        }
        fn read(&self) -> Result<Gguf> {
            Gguf::read(&mut self.0.as_slice())
        }
    }

    #[test]
    fn reads_every_value_type() -> Result<()> {
        let mut w = Writer::header(3, 1, 14);
        w.str("u8").u32(0).raw(&[200]);
        w.str("i8").u32(1).raw(&[0xff]);
        w.str("u16").u32(2).raw(&600u16.to_le_bytes());
        w.str("i16").u32(3).raw(&(-600i16).to_le_bytes());
        w.str("u32").u32(4).u32(70_000);
        w.str("i32").u32(5).raw(&(-7i32).to_le_bytes());
        w.str("f32").u32(6).raw(&1.5f32.to_le_bytes());
        w.str("bool").u32(7).raw(&[1]);
        w.str("string").u32(8).str("héllo");
        w.str("u64").u32(10).u64(1 << 40);
        w.str("i64").u32(11).raw(&(-1i64 << 40).to_le_bytes());
        w.str("f64").u32(12).raw(&0.25f64.to_le_bytes());
        w.str("tokens").u32(9).u32(8).u64(3).str("a").str("").str("<|im_end|>");
        w.str("nested").u32(9).u32(9).u64(2);
        w.u32(4).u64(1).u32(5).u32(0).u64(0);
        w.str("blk.0.attn_q.weight").u32(2).u64(576).u64(576).u32(2).u64(0);
        let g = w.read()?;
        assert_eq!(g.version, 3);
        let v = |k: &str| g.get(k).unwrap();
        assert_eq!(v("u8"), &Value::U8(200));
        assert_eq!(v("i8").as_i64(), Some(-1));
        assert_eq!(v("u16").as_u32(), Some(600));
        assert_eq!(v("i16").as_i64(), Some(-600));
        assert_eq!(v("u32").as_u32(), Some(70_000));
        assert_eq!(v("i32").as_u32(), None);
        assert_eq!(v("f32").as_f32(), Some(1.5));
        assert_eq!(v("bool").as_bool(), Some(true));
        assert_eq!(v("string").as_str(), Some("héllo"));
        assert_eq!(v("u64").as_i64(), Some(1 << 40));
        assert_eq!(v("u64").as_u32(), None);
        assert_eq!(v("i64").as_i64(), Some(-1 << 40));
        assert_eq!(v("f64").as_f32(), Some(0.25));
        let tokens: Vec<&str> = v("tokens").as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(tokens, ["a", "", "<|im_end|>"]);
        assert_eq!(v("nested"), &Value::Array(vec![Value::Array(vec![Value::U32(5)]), Value::Array(vec![])]));
        assert_eq!(g.tensor_names, HashSet::from(["blk.0.attn_q.weight".to_string()]));
        assert!(g.require("missing").unwrap_err().to_string().contains("missing metadata missing"));
        Ok(())
    }

    #[test]
    fn stops_before_the_tensor_data() -> Result<()> {
        let mut w = Writer::header(2, 0, 1);
        w.str("general.architecture").u32(8).str("llama");
        w.raw(&[0xde; 64]);
        let mut input = w.0.as_slice();
        let g = Gguf::read(&mut input)?;
        assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(input.len(), 64, "the tensor data is left unread");
        Ok(())
    }

    fn refusal(w: &Writer) -> String {
        w.read().unwrap_err().to_string()
    }

    #[test]
    fn refuses_malformed_and_hostile_files() {
        assert!(refusal(&Writer(b"this is not a gguf file at all".to_vec())).contains("not a GGUF file"));
        assert!(refusal(&Writer::header(1, 0, 0)).contains("version 1"));
        assert!(refusal(&Writer(b"GGUF\x03\x00".to_vec())).contains("truncated"));
        assert!(refusal(&Writer::header(3, 0, u64::MAX)).contains("at most 65536"));
        assert!(refusal(&Writer::header(3, 1 << 20, 0)).contains("tensors, at most"));

        let mut w = Writer::header(3, 0, 1);
        w.str("k").u32(8).u64(u64::MAX);
        assert!(refusal(&w).contains("string of"), "{}", refusal(&w));
        let mut w = Writer::header(3, 0, 1);
        w.str("k").u32(8).u64(1000).raw(b"short");
        assert!(refusal(&w).contains("truncated"));
        let mut w = Writer::header(3, 0, 1);
        w.str("tokens").u32(9).u32(8).u64(u64::MAX / 2);
        assert!(refusal(&w).contains("tokens: ") && refusal(&w).contains("array elements, at most"), "{}", refusal(&w));
        let mut w = Writer::header(3, 0, 3);
        for k in ["a", "b", "c"] {
            w.str(k).u32(9).u32(0).u64(MAX_ARRAY_LEN).raw(&vec![0; MAX_ARRAY_LEN as usize]);
        }
        assert!(refusal(&w).contains("in all"));
        let mut w = Writer::header(3, 0, 1);
        w.str("deep").u32(9);
        for _ in 0..=MAX_DEPTH {
            w.u32(9).u64(1);
        }
        assert!(refusal(&w).contains("nested"), "{}", refusal(&w));
        let mut w = Writer::header(3, 0, 1);
        w.str("k").u32(13).u32(0);
        assert!(refusal(&w).contains("unknown value type 13"));
        let mut w = Writer::header(3, 0, 1);
        w.str("k").u32(7).raw(&[2]);
        assert!(refusal(&w).contains("bool byte 2"));
        let mut w = Writer::header(3, 1, 0);
        w.str("t").u32(9);
        assert!(refusal(&w).contains("9 dimensions"));
    }
}
