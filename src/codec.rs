//! Codecs turn typed keys and values into bytes and back.
//!
//! Every topic has a key codec and a value codec. [`Json`] is the default; [`Raw`] passes bytes
//! through and [`Utf8`] reads and writes UTF-8 text. Implement [`Codec`] for anything else
//! (Avro, protobuf, compressed JSON, ...).
//!
//! Codecs can also be named by string, as Faust's serializers are (`key_serializer='json'`):
//! see [`by_name`] and [`SERIALIZERS`], [`Topic::key_serializer`](crate::Topic::key_serializer)
//! and the app-wide [`Settings::key_serializer`](crate::Settings::key_serializer).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// The names of the serializers [`by_name`] knows: `json` ([`Json`], any serde type), `raw`
/// (the bytes as they are: [`Raw`] for [`Bytes`], the text's UTF-8 bytes for `String`) and
/// `utf-8` ([`Utf8`], for `String`).
pub const SERIALIZERS: &[&str] = &["json", "raw", "utf-8"];

/// Why a serializer named by string cannot be used.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerializerError {
    /// No serializer has this name.
    #[error("unknown serializer {name:?}: the known serializers are {}", SERIALIZERS.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The serializer exists but cannot carry this type.
    #[error("serializer {name:?} cannot carry values of type {type_name}: it takes {takes}")]
    WrongType {
        /// The serializer's name.
        name: &'static str,
        /// The type it was asked to carry.
        type_name: &'static str,
        /// The types it can carry.
        takes: &'static str,
    },
}

/// The codec of the serializer named `name` (one of [`SERIALIZERS`]) for values of type `T`.
///
/// ```
/// use rill::codec::{by_name, SerializerError};
/// use rill::Bytes;
///
/// let json = by_name::<Vec<u32>>("json").unwrap();
/// assert_eq!(&json.encode(&vec![1, 2]).unwrap()[..], b"[1,2]");
/// let raw = by_name::<Bytes>("raw").unwrap();
/// assert_eq!(&raw.encode(&Bytes::from_static(b"\x01")).unwrap()[..], b"\x01");
/// let err = by_name::<u32>("yaml").unwrap_err();
/// assert!(matches!(err, SerializerError::Unknown { .. }));
/// assert_eq!(err.to_string(), "unknown serializer \"yaml\": the known serializers are json, raw, utf-8");
/// ```
pub fn by_name<T>(name: &str) -> Result<Arc<dyn Codec<T>>, SerializerError>
where
    T: Serialize + DeserializeOwned + 'static,
{
    let wrong = |name: &'static str, takes: &'static str| SerializerError::WrongType {
        name,
        type_name: std::any::type_name::<T>(),
        takes,
    };
    match name {
        "json" => Ok(Arc::new(Json::<T>::new())),
        "raw" => {
            let bytes: Arc<dyn Codec<Bytes>> = Arc::new(Raw);
            let text: Arc<dyn Codec<String>> = Arc::new(RawText);
            downcast::<T, _>(bytes)
                .or_else(|| downcast::<T, _>(text))
                .ok_or_else(|| wrong("raw", "Bytes or String"))
        }
        "utf-8" => {
            let text: Arc<dyn Codec<String>> = Arc::new(Utf8);
            downcast::<T, _>(text).ok_or_else(|| wrong("utf-8", "String"))
        }
        other => Err(SerializerError::Unknown {
            name: other.to_owned(),
        }),
    }
}

/// The codec rill uses for `T` when no serializer is named: [`Raw`] for [`Bytes`], [`Json`]
/// for everything else.
pub(crate) fn default_for<T>() -> Arc<dyn Codec<T>>
where
    T: Serialize + DeserializeOwned + 'static,
{
    let bytes: Arc<dyn Codec<Bytes>> = Arc::new(Raw);
    downcast::<T, _>(bytes).unwrap_or_else(|| Arc::new(Json::<T>::new()))
}

/// `codec` as a codec of `T`, if `T` is the type it carries.
fn downcast<T: 'static, C: Any>(codec: C) -> Option<Arc<dyn Codec<T>>> {
    let any: Box<dyn Any> = Box::new(codec);
    any.downcast::<Arc<dyn Codec<T>>>().ok().map(|b| *b)
}

/// Text as its UTF-8 bytes, named `raw`: the `raw` serializer for `String`.
#[derive(Debug, Clone, Copy)]
struct RawText;

impl Codec<String> for RawText {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn encode(&self, value: &String) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(value.as_bytes()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| CodecError::new("raw", e))
    }
}

/// Stands in for a serializer that cannot be used (its error says why): every encode and
/// decode fails with that error.
pub(crate) struct Unusable {
    pub(crate) error: SerializerError,
}

impl<T> Codec<T> for Unusable {
    fn name(&self) -> &'static str {
        match &self.error {
            SerializerError::WrongType { name, .. } => name,
            SerializerError::Unknown { .. } => "unknown",
        }
    }

    fn encode(&self, _: &T) -> Result<Bytes, CodecError> {
        Err(CodecError::new(Codec::<T>::name(self), &self.error))
    }

    fn decode(&self, _: &[u8]) -> Result<T, CodecError> {
        Err(CodecError::new(Codec::<T>::name(self), &self.error))
    }
}

/// Why a codec could not encode or decode a payload.
#[derive(Debug, thiserror::Error)]
#[error("{codec} codec: {message}")]
pub struct CodecError {
    /// The codec's name, e.g. `json`.
    pub codec: &'static str,
    /// What went wrong, in the codec's words.
    pub message: String,
}

impl CodecError {
    /// A new error from the codec named `codec`.
    pub fn new(codec: &'static str, message: impl fmt::Display) -> Self {
        Self {
            codec,
            message: message.to_string(),
        }
    }
}

/// Encodes values of type `T` to bytes and decodes them back.
///
/// Codecs are shared between tasks, so they must be cheap to call concurrently.
pub trait Codec<T>: Send + Sync + 'static {
    /// A short name used in logs and errors, e.g. `json`.
    fn name(&self) -> &'static str;
    /// Encodes `value`.
    fn encode(&self, value: &T) -> Result<Bytes, CodecError>;
    /// Decodes a payload. Empty payloads and tombstones reach the codec as an empty slice.
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
    /// Encodes a key or value typed on the command line (`send --key`). By default the text's
    /// UTF-8 bytes; [`Json`] reads the text as a JSON `T` (bare text as a string) and
    /// encodes that, so `--key word` becomes `"word"` and `--key 42` stays `42`.
    fn encode_text(&self, text: &str) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl<T: 'static> fmt::Debug for dyn Codec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Codec").field(&self.name()).finish()
    }
}

/// JSON through `serde_json`: the default codec for keys and values. An empty payload or a
/// tombstone decodes as `null` (`None` for an `Option`, an error for other types).
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Json<T> {
    /// The JSON codec for `T`.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for Json<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Json<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Json<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Json")
    }
}

impl<T> Codec<T> for Json<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    fn name(&self) -> &'static str {
        "json"
    }

    fn encode(&self, value: &T) -> Result<Bytes, CodecError> {
        // Written into this thread's scratch buffer, then copied out at its exact size: one
        // allocation per value (`to_vec` makes two, the second to shrink it).
        SCRATCH
            .with(|scratch| {
                let Ok(mut buf) = scratch.try_borrow_mut() else {
                    // A value whose serializer encodes JSON itself, on this thread.
                    return serde_json::to_vec(value).map(exact_bytes);
                };
                buf.clear();
                let written =
                    serde_json::to_writer(&mut *buf, value).map(|()| Bytes::copy_from_slice(&buf));
                if buf.capacity() > SCRATCH_KEEP {
                    *buf = Vec::new();
                }
                written
            })
            .map_err(|e| CodecError::new("json", e))
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.is_empty() {
            // An empty payload or a tombstone is JSON's `null`: `Option<T>` reads it as `None`;
            // a type that cannot be null rejects it.
            return serde_json::from_value(serde_json::Value::Null)
                .map_err(|e| CodecError::new("json", format!("empty payload: {e}")));
        }
        serde_json::from_slice(bytes).map_err(|e| CodecError::new("json", e))
    }

    fn encode_text(&self, text: &str) -> Result<Bytes, CodecError> {
        let value: T = serde_json::from_str(text)
            .or_else(|e| {
                serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| e)
            })
            .map_err(|e| CodecError::new("json", format!("{text:?}: {e}")))?;
        self.encode(&value)
    }
}

thread_local! {
    /// Where [`Json`] encodes values before copying them out.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest scratch buffer a thread keeps between values.
const SCRATCH_KEEP: usize = 64 * 1024;

/// `buf` as [`Bytes`] holding no spare capacity.
///
/// `Bytes::from(Vec)` keeps the vector's whole allocation alive for as long as any clone of the
/// bytes lives: `serde_json::to_vec` starts at 128 bytes, so a 20-byte value kept in a log (or a
/// table, or a batch) would hold 128. Encoders that build a `Vec` hand it over through here.
pub(crate) fn exact_bytes(mut buf: Vec<u8>) -> Bytes {
    buf.shrink_to_fit();
    Bytes::from(buf)
}

/// Bytes as they are, with no encoding. Values are [`Bytes`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn encode(&self, value: &Bytes) -> Result<Bytes, CodecError> {
        Ok(value.clone())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(bytes))
    }
}

/// UTF-8 text. Values are [`String`]; invalid UTF-8 is a decode error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn name(&self) -> &'static str {
        "utf-8"
    }

    fn encode(&self, value: &String) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(value.as_bytes()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| CodecError::new("utf-8", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_errors() {
        let c = Json::<Vec<i32>>::new();
        let b = c.encode(&vec![1, 2]).unwrap();
        assert_eq!(&b[..], b"[1,2]");
        assert_eq!(c.decode(&b).unwrap(), vec![1, 2]);
        assert!(c.decode(b"").unwrap_err().message.contains("empty"));
        assert_eq!(Json::<Option<u8>>::new().decode(b"").unwrap(), None);
        assert!(c.decode(b"{\"a\":1}").is_err());
    }

    #[test]
    fn command_line_text_is_encoded_as_the_codec_expects() {
        let text = |c: &dyn Codec<String>, t| c.encode_text(t).map(|b| b.to_vec());
        assert_eq!(text(&Json::<String>::new(), "word").unwrap(), b"\"word\"");
        assert_eq!(
            text(&Json::<String>::new(), "\"word\"").unwrap(),
            b"\"word\""
        );
        assert_eq!(text(&Utf8, "word").unwrap(), b"word");
        assert_eq!(&Json::<u64>::new().encode_text("42").unwrap()[..], b"42");
        let err = Json::<u64>::new().encode_text("forty-two").unwrap_err();
        assert!(err.message.contains("forty-two"), "{err}");
        assert_eq!(&Raw.encode_text("k1").unwrap()[..], b"k1");
    }

    #[test]
    fn serializers_by_name_carry_their_types() {
        assert_eq!(by_name::<u32>("json").unwrap().name(), "json");
        assert_eq!(by_name::<Bytes>("json").unwrap().name(), "json");
        assert_eq!(by_name::<Bytes>("raw").unwrap().name(), "raw");
        let raw_text = by_name::<String>("raw").unwrap();
        assert_eq!(
            &raw_text.encode(&"hé".to_owned()).unwrap()[..],
            "hé".as_bytes()
        );
        assert_eq!(by_name::<String>("utf-8").unwrap().name(), "utf-8");
        let err = by_name::<u32>("raw").unwrap_err().to_string();
        assert!(err.contains("\"raw\"") && err.contains("u32"), "{err}");
        let err = by_name::<u32>("pickle").unwrap_err().to_string();
        assert!(
            err.contains("\"pickle\"") && err.contains("json, raw, utf-8"),
            "{err}"
        );
        assert_eq!(default_for::<Bytes>().name(), "raw");
        assert_eq!(default_for::<String>().name(), "json");
    }

    #[test]
    fn encoded_values_hold_no_spare_capacity() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Add {
            a: i64,
            b: i64,
        }
        let bytes = Json::<Add>::new().encode(&Add { a: 7, b: 1 }).unwrap();
        assert_eq!(&bytes[..], br#"{"a":7,"b":1}"#);
        // Taking the only handle back as a vector shows the allocation it keeps alive.
        let buf = Vec::<u8>::from(bytes);
        assert_eq!(buf.capacity(), buf.len(), "spare capacity kept");
        let v = Vec::<u8>::from(exact_bytes(Vec::with_capacity(4096)));
        assert_eq!(v.capacity(), 0);
    }

    #[test]
    fn utf8_rejects_invalid() {
        assert_eq!(Utf8.decode(b"hi").unwrap(), "hi");
        assert!(Utf8.decode(&[0xff, 0xfe]).is_err());
    }
}
