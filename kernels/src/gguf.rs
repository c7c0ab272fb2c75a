//! GGUF reading (memory-mapped): header, metadata, tensor infos, alignment, and bounds-
//! checked views of tensor data. Versions 2 and 3. Tensor types F32, F16, BF16, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and the 4-bit
//! non-linear IQ4_NL, IQ4_XS (what llama.cpp's Q2_K … Q6_K and IQ4 files hold); anything else, a truncated file, a wrong magic or a tensor
//! that runs past the end is an error, never a panic or an out-of-bounds read.

use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    Version(u32),
    #[error("file truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated {
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("bad metadata: {0}")]
    Metadata(String),
    #[error(
        "tensor {name}: unsupported type {ty} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
         Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)"
    )]
    UnsupportedType { name: String, ty: u32 },
    #[error("tensor {name}: {why}")]
    Tensor { name: String, why: String },
}

/// A tensor element type (ggml's names).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            20 => Self::IQ4_NL,
            23 => Self::IQ4_XS,
            30 => Self::BF16,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::IQ4_NL => 20,
            Self::IQ4_XS => 23,
            Self::BF16 => 30,
        }
    }
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4_NL => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::IQ4_XS => 256,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::IQ4_NL => 18,
            Self::IQ4_XS => 136,
        }
    }
    /// Whether the matrix kernels (CPU and packed) read this layout as it is; the other
    /// quantized layouts are converted at load ([`crate::kquant::to_kernel_layout`]).
    pub fn kernel_native(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1 | Self::Q8_0)
    }
    /// Whether it is a block-quantized layout (not F32, F16, BF16).
    pub fn quantized(self) -> bool {
        self.block_elems() > 1
    }
}

/// A metadata value.
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
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (GGML's `ne`): a weight matrix is `[in, out]`.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elems(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An opened GGUF file.
pub struct Gguf {
    mmap: Mmap,
    /// The file it was opened from (none when parsed from memory).
    pub path: Option<std::path::PathBuf>,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                offset: self.pos,
                needed: n,
                len: self.buf.len(),
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        // Every element takes at least a byte: a count past the file's end is corrupt.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufError::Truncated {
                offset: self.pos,
                needed: n as usize,
                len: self.buf.len(),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| GgufError::Metadata(format!("string at {} is not UTF-8", self.pos)))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Metadata("arrays nested too deep".into()));
                }
                let inner = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(GgufError::Metadata(format!("unknown value type {other}"))),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: the file is mapped read-only; tollgate never writes model files while
        // serving them (a concurrent external writer is outside what we guard against).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut g = Self::parse(mmap)?;
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    fn parse(mmap: Mmap) -> Result<Self, GgufError> {
        let mut r = Reader { buf: &mmap, pos: 0 };
        let magic: [u8; 4] = r.arr()?;
        if &magic != b"GGUF" {
            return Err(GgufError::Magic(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::Metadata(format!(
                "bad general.alignment {alignment}"
            )));
        }
        let mut raw = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Tensor {
                    name,
                    why: format!("{n_dims} dimensions"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()? as usize);
            }
            let ty_id = r.u32()?;
            let offset = r.u64()? as usize;
            raw.push((name, dims, ty_id, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let len = mmap.len();
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, ty_id, offset) in raw {
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnsupportedType {
                name: name.clone(),
                ty: ty_id,
            })?;
            let bad = |why: String| GgufError::Tensor {
                name: name.clone(),
                why,
            };
            let n_elems = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad("size overflows".into()))?;
            if dims[0] % ty.block_elems() != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the block size {}",
                    dims[0],
                    ty.block_elems()
                )));
            }
            let n_bytes = n_elems / ty.block_elems() * ty.block_bytes();
            let abs = data_start
                .checked_add(offset)
                .filter(|a| a.checked_add(n_bytes).is_some_and(|e| e <= len))
                .ok_or_else(|| {
                    bad(format!(
                        "data [{offset}+{n_bytes}] runs past the end of the file ({len} bytes)"
                    ))
                })?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset: abs,
                n_bytes,
            });
        }
        Ok(Self {
            mmap,
            path: None,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds checked at open).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.n_bytes]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| GgufError::Metadata(format!("missing or non-integer {key}")))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| GgufError::Metadata(format!("missing or non-numeric {key}")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| GgufError::Metadata(format!("missing or non-string {key}")))
    }

    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| GgufError::Metadata(format!("missing or non-string-array {key}")))
    }
}

/// Writes GGUF v3 files (used by the synthetic model writer and tests).
pub mod write {
    use super::{GgmlType, Value};
    use std::io::{self, Write};

    fn string(w: &mut impl Write, s: &str) -> io::Result<()> {
        w.write_all(&(s.len() as u64).to_le_bytes())?;
        w.write_all(s.as_bytes())
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn value(w: &mut impl Write, v: &Value) -> io::Result<()> {
        match v {
            Value::U8(x) => w.write_all(&[*x]),
            Value::I8(x) => w.write_all(&[*x as u8]),
            Value::U16(x) => w.write_all(&x.to_le_bytes()),
            Value::I16(x) => w.write_all(&x.to_le_bytes()),
            Value::U32(x) => w.write_all(&x.to_le_bytes()),
            Value::I32(x) => w.write_all(&x.to_le_bytes()),
            Value::U64(x) => w.write_all(&x.to_le_bytes()),
            Value::I64(x) => w.write_all(&x.to_le_bytes()),
            Value::F32(x) => w.write_all(&x.to_le_bytes()),
            Value::F64(x) => w.write_all(&x.to_le_bytes()),
            Value::Bool(x) => w.write_all(&[*x as u8]),
            Value::String(s) => string(w, s),
            Value::Array(a) => {
                let inner = a.first().map(type_id).unwrap_or(4);
                w.write_all(&inner.to_le_bytes())?;
                w.write_all(&(a.len() as u64).to_le_bytes())?;
                a.iter().try_for_each(|x| value(w, x))
            }
        }
    }

    /// A tensor to write: name, dims (innermost first), type and its encoded bytes.
    pub struct Tensor {
        pub name: String,
        pub dims: Vec<usize>,
        pub ty: GgmlType,
        pub data: Vec<u8>,
    }

    pub fn gguf(
        w: &mut impl Write,
        metadata: &[(String, Value)],
        tensors: &[Tensor],
    ) -> io::Result<()> {
        const ALIGN: usize = 32;
        let mut head = Vec::new();
        head.write_all(b"GGUF")?;
        head.write_all(&3u32.to_le_bytes())?;
        head.write_all(&(tensors.len() as u64).to_le_bytes())?;
        head.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (k, v) in metadata {
            string(&mut head, k)?;
            head.write_all(&type_id(v).to_le_bytes())?;
            value(&mut head, v)?;
        }
        let mut offset = 0usize;
        for t in tensors {
            string(&mut head, &t.name)?;
            head.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                head.write_all(&(*d as u64).to_le_bytes())?;
            }
            head.write_all(&t.ty.id().to_le_bytes())?;
            head.write_all(&(offset as u64).to_le_bytes())?;
            offset = (offset + t.data.len()).div_ceil(ALIGN) * ALIGN;
        }
        let pad = head.len().div_ceil(ALIGN) * ALIGN - head.len();
        head.resize(head.len() + pad, 0);
        w.write_all(&head)?;
        for t in tensors {
            w.write_all(&t.data)?;
            let pad = t.data.len().div_ceil(ALIGN) * ALIGN - t.data.len();
            w.write_all(&vec![0u8; pad])?;
        }
        Ok(())
    }
}
