//! Faust's wire forms, so that Faust (faust-streaming) and rill workers share a cluster: the
//! headers of its `ask`, the `ReqRepRequest` and `ReqRepResponse` records it wraps requests
//! and replies in, and [`FaustRecord`], a value written with the `__faust` namespace Faust's
//! `Record` classes are decoded by.
//!
//! A Faust record is a JSON object with one more field, `"__faust": {"ns": "module.Class"}`.
//! rill reads them into plain serde structs, which ignore that field (unless they are
//! `#[serde(deny_unknown_fields)]`: wrap those in [`FaustRecord`], which takes the field off
//! first).

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::ops::{Deref, DerefMut};

/// Header of a Faust `ask` naming the topic its reply goes to.
pub(crate) const REPLY_TO: &str = "Faust-Ag-ReplyTo";
/// Header of a Faust `ask` carrying its correlation id.
pub(crate) const CORRELATION_ID: &str = "Faust-Ag-CorrelationId";

/// The namespace Faust gives its request envelope for a plain value...
const REQUEST_NS: &str = "@ReqRepRequest";
/// ...and for a value that is a Faust model.
const MODEL_REQUEST_NS: &str = "faust.agents.models.ModelReqRepRequest";
/// The namespace of Faust's reply envelope (rill writes this one; Faust writes the model one
/// below when the value is a model).
const RESPONSE_NS: &str = "@ReqRepResponse";
const MODEL_RESPONSE_NS: &str = "faust.agents.models.ModelReqRepResponse";

/// A Faust model's namespace, as Faust writes it in a record's `__faust` field: by default the
/// module and class name of the `Record` class (`"orders.Add"` for class `Add` in module
/// `orders`), or the `namespace=` given to the class.
///
/// ```
/// use rill::faust::FaustModel;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Add {
///     a: i64,
///     b: i64,
/// }
///
/// impl FaustModel for Add {
///     // class Add(faust.Record): ... in the module `orders`
///     const NAMESPACE: &'static str = "orders.Add";
/// }
/// ```
pub trait FaustModel {
    /// The namespace: `"module.ClassName"`.
    const NAMESPACE: &'static str;
}

/// A value written as a Faust record: its JSON object with `"__faust": {"ns": ...}` added, so a
/// Faust agent decodes it into its `Record` class (by the namespace, whatever the agent's
/// `value_type`). Reading, the `__faust` field is taken off before `T` sees the rest.
///
/// Use it as a topic's value type, an agent's input, or what an agent yields (a Faust `ask`
/// then gets a model back rather than a dict):
///
/// ```
/// use rill::faust::{FaustModel, FaustRecord};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Add {
///     a: i64,
///     b: i64,
/// }
/// impl FaustModel for Add {
///     const NAMESPACE: &'static str = "orders.Add";
/// }
///
/// let json = serde_json::to_string(&FaustRecord(Add { a: 1, b: 2 })).unwrap();
/// assert_eq!(json, r#"{"a":1,"b":2,"__faust":{"ns":"orders.Add"}}"#);
/// let back: FaustRecord<Add> = serde_json::from_str(&json).unwrap();
/// assert_eq!(back.0, Add { a: 1, b: 2 });
/// ```
///
/// `T` must serialize as a JSON object (a struct or a map).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FaustRecord<T>(pub T);

impl<T> FaustRecord<T> {
    /// The value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> From<T> for FaustRecord<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> Deref for FaustRecord<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for FaustRecord<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for FaustRecord<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Serialize)]
struct Ns<'a> {
    ns: &'a str,
}

impl<T: Serialize + FaustModel> Serialize for FaustRecord<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a, T> {
            #[serde(flatten)]
            value: &'a T,
            __faust: Ns<'static>,
        }
        Out {
            value: &self.0,
            __faust: Ns { ns: T::NAMESPACE },
        }
        .serialize(serializer)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for FaustRecord<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "T: DeserializeOwned")]
        struct In<T> {
            #[serde(flatten)]
            value: T,
            #[allow(dead_code)]
            #[serde(default)]
            __faust: Option<IgnoredAny>,
        }
        In::<T>::deserialize(deserializer).map(|i| Self(i.value))
    }
}

/// A request a Faust `ask` wrapped in its `ReqRepRequest` record (what Faust sends when the
/// asked agent is declared with `use_reply_headers=False` on the asking side).
#[derive(Debug)]
pub(crate) struct Request {
    /// The asked value, as JSON.
    pub(crate) value: Vec<u8>,
    pub(crate) reply_to: String,
    pub(crate) correlation_id: String,
}

#[derive(Deserialize)]
struct Envelope {
    __faust: Option<NsOwned>,
}

#[derive(Deserialize)]
struct NsOwned {
    ns: String,
}

/// The namespace of a JSON object that is a Faust record, without parsing all of it when it
/// cannot be one.
fn namespace(bytes: &[u8]) -> Option<String> {
    // Every Faust record has this field; most values without it are rejected here.
    const MARK: &[u8] = b"\"__faust\"";
    if bytes.first().copied() != Some(b'{') || memchr::memmem::find(bytes, MARK).is_none() {
        return None;
    }
    let envelope: Envelope = serde_json::from_slice(bytes).ok()?;
    envelope.__faust.map(|ns| ns.ns)
}

/// The request inside `bytes`, if they are a Faust `ReqRepRequest` record.
pub(crate) fn unwrap_request(bytes: &[u8]) -> Option<Request> {
    let ns = namespace(bytes)?;
    if ns != REQUEST_NS && ns != MODEL_REQUEST_NS {
        return None;
    }
    #[derive(Deserialize)]
    struct Req {
        value: Box<serde_json::value::RawValue>,
        reply_to: String,
        correlation_id: String,
    }
    let req: Req = serde_json::from_slice(bytes).ok()?;
    Some(Request {
        value: req.value.get().as_bytes().to_vec(),
        reply_to: req.reply_to,
        correlation_id: req.correlation_id,
    })
}

/// A Faust `ReqRepResponse` record carrying `value` (already JSON), for the request with
/// `correlation_id` whose message had `key`. Faust's reply reader takes the correlation id and
/// the value from it; the key is informative (as text when it is UTF-8).
pub(crate) fn response(key: Option<&[u8]>, value: &[u8], correlation_id: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Resp<'a> {
        key: Option<&'a str>,
        value: &'a serde_json::value::RawValue,
        correlation_id: &'a str,
        __faust: Ns<'static>,
    }
    let value: &serde_json::value::RawValue = match serde_json::from_slice(value) {
        Ok(raw) => raw,
        // Not JSON: rill serializes replies with serde_json, so this does not happen; the
        // reply is then null rather than a record Faust cannot read.
        Err(_) => serde_json::value::RawValue::NULL,
    };
    let key = key.and_then(|k| std::str::from_utf8(k).ok());
    serde_json::to_vec(&Resp {
        key,
        value,
        correlation_id,
        __faust: Ns { ns: RESPONSE_NS },
    })
    .unwrap_or_default()
}

/// The correlation id and the value (as JSON) of a Faust `ReqRepResponse` record.
pub(crate) fn unwrap_response(bytes: &[u8]) -> Option<(String, Vec<u8>)> {
    let ns = namespace(bytes)?;
    if ns != RESPONSE_NS && ns != MODEL_RESPONSE_NS {
        return None;
    }
    #[derive(Deserialize)]
    struct Resp {
        value: Box<serde_json::value::RawValue>,
        correlation_id: String,
    }
    let resp: Resp = serde_json::from_slice(bytes).ok()?;
    Some((resp.correlation_id, resp.value.get().as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_both_faust_forms_unwrap() {
        let plain =
            br#"{"value":3,"reply_to":"t","correlation_id":"c","__faust":{"ns":"@ReqRepRequest"}}"#;
        let r = unwrap_request(plain).expect("a plain request");
        assert_eq!(
            (
                r.value.as_slice(),
                r.reply_to.as_str(),
                r.correlation_id.as_str()
            ),
            (&b"3"[..], "t", "c")
        );
        let model = br#"{"value":{"a":1,"b":2,"__faust":{"ns":"fx.Add"}},"reply_to":"t","correlation_id":"c","__faust":{"ns":"faust.agents.models.ModelReqRepRequest"}}"#;
        let r = unwrap_request(model).expect("a model request");
        assert_eq!(r.value, br#"{"a":1,"b":2,"__faust":{"ns":"fx.Add"}}"#);
        assert!(unwrap_request(br#"{"a":1,"__faust":{"ns":"fx.Add"}}"#).is_none());
        assert!(unwrap_request(br#"{"value":1,"reply_to":"t","correlation_id":"c"}"#).is_none());
        assert!(unwrap_request(b"17").is_none());
    }

    #[test]
    fn responses_round_trip() {
        let bytes = response(Some(b"k"), br#"{"sum":3}"#, "c-1");
        assert_eq!(
            bytes,
            br#"{"key":"k","value":{"sum":3},"correlation_id":"c-1","__faust":{"ns":"@ReqRepResponse"}}"#
        );
        assert_eq!(
            unwrap_response(&bytes),
            Some(("c-1".to_owned(), br#"{"sum":3}"#.to_vec()))
        );
    }
}
