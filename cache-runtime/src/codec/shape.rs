//! The fingerprint of a stored type's shape, written into every entry's header.
//!
//! A type's shape is what serde sees of it: struct and enum names, field and
//! variant names in order, and the shapes of the fields, recursively. It is
//! traced by deserializing the type from a probe that records each request and
//! answers with a placeholder value, once per variant of each enum, and hashed
//! with xxh3. Any change a field reorder, rename, retype, addition or removal
//! makes to that shape changes the fingerprint, so an entry written by another
//! build of the type reads as a miss instead of as different values.
//!
//! Some types can't be traced: those whose `Deserialize` needs a self-describing
//! format (`deserialize_any`: `serde_json::Value`, untagged enums) or rejects
//! the placeholders (`NonZeroU32`, a timestamp parsed from a string). Those are
//! fingerprinted by [`std::any::type_name`] instead: a change of the type's name
//! is still a miss, a change inside it is not, so bump `version` when such a
//! type changes. `type_name` may also differ between compiler versions, which
//! costs one miss per entry after such an upgrade, never a wrong value.
//!
//! Written here rather than taken from `serde-reflection`: that crate traces a
//! recursive enum whose first variant contains itself (`enum Expr { Add(Box<Expr>,
//! Box<Expr>), Lit(i64) }`) until the stack overflows, and a cache can't bring
//! down the process for the shape of a type it was handed.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Fingerprints traced so far: read on every encode and decode, written once per type.
static FINGERPRINTS: LazyLock<ArcSwap<Fingerprints>> = LazyLock::new(ArcSwap::default);

type Fingerprints = HashMap<TypeId, u64, BuildHasherDefault<TypeIdHasher>>;

/// A `TypeId` is a hash already: hashing it again (SipHash) would cost every
/// hit more than the rest of the lookup.
#[derive(Default)]
struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64 ^ (n >> 64) as u64;
    }
}

/// Deeper than any real type nests; a guard against types whose every variant recurses.
const MAX_DEPTH: usize = 96;
/// Each pass explores one more variant of every enum; no real type needs this many.
const MAX_PASSES: usize = 256;

/// The fingerprint of `T`'s shape, traced on first use and cached for the process.
pub(crate) fn of<T: Deserialize<'static>>() -> u64 {
    // `typeid` accepts borrowed types such as `&str`, which `TypeId::of` can't.
    let id = typeid::of::<T>();
    if let Some(&fingerprint) = FINGERPRINTS.load().get(&id) {
        return fingerprint;
    }
    let fingerprint = compute::<T>();
    FINGERPRINTS.rcu(|map| {
        let mut map = Fingerprints::clone(map);
        map.insert(id, fingerprint);
        Arc::new(map)
    });
    fingerprint
}

pub(super) fn compute<T: Deserialize<'static>>() -> u64 {
    let mut bytes = Vec::with_capacity(256);
    match trace::<T>() {
        Ok(shape) => {
            bytes.extend_from_slice(b"shape:");
            // Serializing our own plain data to a Vec can't fail.
            serde_json::to_writer(&mut bytes, &shape).expect("a traced shape serializes");
        }
        Err(e) => {
            tracing::debug!(
                r#type = std::any::type_name::<T>(),
                error = %e.0,
                "type can't be traced: fingerprinted by its name"
            );
            bytes.extend_from_slice(b"name:");
            bytes.extend_from_slice(std::any::type_name::<T>().as_bytes());
        }
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// What a type looks like to serde, in a form that hashes the same in every build.
#[derive(Debug, Serialize)]
struct Traced {
    root: Shape,
    containers: BTreeMap<&'static str, Container>,
    enums: BTreeMap<&'static str, Vec<(&'static str, Option<Variant>)>>,
}

fn trace<T: Deserialize<'static>>() -> Result<Traced, TraceError> {
    let mut probe = Probe::default();
    for _ in 0..MAX_PASSES {
        let mut root = Shape::Unknown;
        T::deserialize(Probing { probe: &mut probe, out: &mut root, minimal: false })?;
        if probe.enums.values().all(|e| e.variants.iter().all(Option::is_some)) {
            let enums = probe
                .enums
                .into_iter()
                .map(|(name, e)| (name, e.names.iter().copied().zip(e.variants).collect()))
                .collect();
            return Ok(Traced { root, containers: probe.containers, enums });
        }
    }
    Err(TraceError(format!("enum variants still untraced after {MAX_PASSES} passes")))
}

#[derive(Debug, Clone, Serialize)]
enum Shape {
    /// Not reached: only in subtrees that are never recorded.
    Unknown,
    Bool,
    I8,
    I16,
    I32,
    I64,
    I128,
    U8,
    U16,
    U32,
    U64,
    U128,
    F32,
    F64,
    Char,
    Str,
    Bytes,
    Unit,
    Option(Box<Shape>),
    Seq(Box<Shape>),
    Map(Box<Shape>, Box<Shape>),
    Tuple(Vec<Shape>),
    /// A named container, described once in [`Traced`] so recursive types stay finite.
    Named(&'static str),
}

#[derive(Debug, Serialize)]
enum Container {
    Unit,
    Newtype(Shape),
    Tuple(Vec<Shape>),
    Struct(Vec<(&'static str, Shape)>),
}

#[derive(Debug, Serialize)]
enum Variant {
    Unit,
    Newtype(Shape),
    Tuple(Vec<Shape>),
    Struct(Vec<(&'static str, Shape)>),
}

struct EnumProgress {
    names: &'static [&'static str],
    variants: Vec<Option<Variant>>,
}

/// What the passes have learnt, and where the current one is.
#[derive(Default)]
struct Probe {
    containers: BTreeMap<&'static str, Container>,
    enums: BTreeMap<&'static str, EnumProgress>,
    /// Named containers on the current path, outermost first.
    path: Vec<&'static str>,
    /// Enum variants being deserialized on the current path.
    choosing: Vec<(&'static str, usize)>,
}

impl Probe {
    /// Enters `name`; whether it is already on the path (a recursive occurrence).
    fn enter(&mut self, name: &'static str) -> Result<bool, TraceError> {
        if self.path.len() >= MAX_DEPTH {
            return Err(TraceError(format!("nested deeper than {MAX_DEPTH} at `{name}`")));
        }
        let recursive = self.path.contains(&name);
        self.path.push(name);
        Ok(recursive)
    }

    fn leave(&mut self) {
        self.path.pop();
    }

    /// Which variant of `name` to build: outside recursion the first one not
    /// yet traced; inside it (`minimal`) one known to end, so recursion stops.
    fn choose(&self, name: &'static str, variants: &'static [&'static str], minimal: bool) -> Option<usize> {
        let busy = |i: usize| self.choosing.contains(&(name, i));
        let traced = self.enums.get(name).map(|e| e.variants.as_slice()).unwrap_or_default();
        let done = |i: usize| traced.get(i).is_some_and(Option::is_some);
        let (first, then): (&dyn Fn(usize) -> bool, &dyn Fn(usize) -> bool) = if minimal {
            (&|i| done(i) && !busy(i), &|i| !busy(i))
        } else {
            (&|i| !done(i) && !busy(i), &|i| !busy(i))
        };
        (0..variants.len()).find(|&i| first(i)).or_else(|| (0..variants.len()).find(|&i| then(i)))
    }
}

/// The probe as a deserializer of one value, whose shape lands in `out`.
///
/// `minimal` marks a recursive occurrence: it builds the smallest value
/// (no elements, `None`, a variant known to end) and records nothing, since
/// its shape is the enclosing occurrence's.
struct Probing<'p> {
    probe: &'p mut Probe,
    out: &'p mut Shape,
    minimal: bool,
}

impl Probing<'_> {
    fn scalar<V>(self, shape: Shape, visit: impl FnOnce() -> Result<V, TraceError>) -> Result<V, TraceError> {
        *self.out = shape;
        visit()
    }

    fn elements<'a>(&'a mut self, slots: &'a mut [Shape], minimal: bool) -> Elements<'a> {
        Elements { probe: self.probe, slots: slots.iter_mut(), minimal }
    }

    /// Deserializes a named container: records its shape unless it is recursive.
    fn named<V>(
        mut self,
        name: &'static str,
        slots: usize,
        visit: impl FnOnce(Elements<'_>) -> Result<V, TraceError>,
        record: impl FnOnce(Vec<Shape>) -> Container,
    ) -> Result<V, TraceError> {
        *self.out = Shape::Named(name);
        let recursive = self.probe.enter(name)?;
        let minimal = self.minimal || recursive;
        let mut shapes = vec![Shape::Unknown; slots];
        let value = visit(self.elements(&mut shapes, minimal));
        self.probe.leave();
        let value = value?;
        if !minimal {
            self.probe.containers.entry(name).or_insert_with(|| record(shapes));
        }
        Ok(value)
    }
}

macro_rules! scalars {
    ($($method:ident => $shape:ident, $visit:ident($($value:expr)?);)*) => {$(
        fn $method<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, TraceError> {
            self.scalar(Shape::$shape, || visitor.$visit($($value)?))
        }
    )*};
}

impl<'p> de::Deserializer<'static> for Probing<'p> {
    type Error = TraceError;

    scalars! {
        deserialize_bool => Bool, visit_bool(false);
        deserialize_i8 => I8, visit_i8(0);
        deserialize_i16 => I16, visit_i16(0);
        deserialize_i32 => I32, visit_i32(0);
        deserialize_i64 => I64, visit_i64(0);
        deserialize_i128 => I128, visit_i128(0);
        deserialize_u8 => U8, visit_u8(0);
        deserialize_u16 => U16, visit_u16(0);
        deserialize_u32 => U32, visit_u32(0);
        deserialize_u64 => U64, visit_u64(0);
        deserialize_u128 => U128, visit_u128(0);
        deserialize_f32 => F32, visit_f32(0.0);
        deserialize_f64 => F64, visit_f64(0.0);
        deserialize_char => Char, visit_char('a');
        // Borrowed, so `&str` and `&[u8]` trace too; their shapes equal `String`'s and `Vec<u8>`'s.
        deserialize_str => Str, visit_borrowed_str("");
        deserialize_string => Str, visit_borrowed_str("");
        deserialize_bytes => Bytes, visit_borrowed_bytes(&[]);
        deserialize_byte_buf => Bytes, visit_borrowed_bytes(&[]);
        deserialize_unit => Unit, visit_unit();
    }

    fn deserialize_any<V: Visitor<'static>>(self, _: V) -> Result<V::Value, TraceError> {
        Err(TraceError("the type needs a self-describing format (deserialize_any)".into()))
    }

    fn deserialize_identifier<V: Visitor<'static>>(self, _: V) -> Result<V::Value, TraceError> {
        Err(TraceError("an identifier outside a struct or enum".into()))
    }

    fn deserialize_ignored_any<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.scalar(Shape::Unit, || visitor.visit_unit())
    }

    fn deserialize_option<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, TraceError> {
        let mut inner = Shape::Unknown;
        let value = if self.minimal {
            visitor.visit_none()
        } else {
            visitor.visit_some(Probing { probe: &mut *self.probe, out: &mut inner, minimal: false })
        };
        *self.out = Shape::Option(Box::new(inner));
        value
    }

    fn deserialize_seq<V: Visitor<'static>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        // One element shows the element's shape; a recursive occurrence needs none.
        let mut slots = if self.minimal { vec![] } else { vec![Shape::Unknown] };
        let minimal = self.minimal;
        let value = visitor.visit_seq(self.elements(&mut slots, minimal));
        *self.out = Shape::Seq(Box::new(slots.pop().unwrap_or(Shape::Unknown)));
        value
    }

    fn deserialize_map<V: Visitor<'static>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        let mut slots = if self.minimal { vec![] } else { vec![Shape::Unknown, Shape::Unknown] };
        let minimal = self.minimal;
        let value = visitor.visit_map(self.elements(&mut slots, minimal));
        let mut slots = slots.into_iter();
        let key = slots.next().unwrap_or(Shape::Unknown);
        *self.out = Shape::Map(Box::new(key), Box::new(slots.next().unwrap_or(Shape::Unknown)));
        value
    }

    fn deserialize_tuple<V: Visitor<'static>>(
        mut self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut slots = vec![Shape::Unknown; len];
        let minimal = self.minimal;
        let value = visitor.visit_seq(self.elements(&mut slots, minimal));
        *self.out = Shape::Tuple(slots);
        value
    }

    fn deserialize_unit_struct<V: Visitor<'static>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.named(name, 0, |_| visitor.visit_unit(), |_| Container::Unit)
    }

    fn deserialize_newtype_struct<V: Visitor<'static>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.named(
            name,
            1,
            |mut elements| visitor.visit_newtype_struct(elements.next_probe()),
            |mut s| Container::Newtype(s.pop().unwrap_or(Shape::Unknown)),
        )
    }

    fn deserialize_tuple_struct<V: Visitor<'static>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.named(name, len, |elements| visitor.visit_seq(elements), Container::Tuple)
    }

    fn deserialize_struct<V: Visitor<'static>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.named(
            name,
            fields.len(),
            |elements| visitor.visit_seq(elements),
            |shapes| Container::Struct(fields.iter().copied().zip(shapes).collect()),
        )
    }

    fn deserialize_enum<V: Visitor<'static>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        *self.out = Shape::Named(name);
        let recursive = self.probe.enter(name)?;
        let minimal = self.minimal || recursive;
        let Some(index) = self.probe.choose(name, variants, minimal) else {
            self.probe.leave();
            return Err(TraceError(format!("no variant of `{name}` ends without recursing")));
        };
        if !minimal {
            self.probe.enums.entry(name).or_insert_with(|| EnumProgress {
                names: variants,
                variants: variants.iter().map(|_| None).collect(),
            });
        }
        self.probe.choosing.push((name, index));
        let mut variant = None;
        let value =
            visitor.visit_enum(Choice { probe: &mut *self.probe, index, variant: &mut variant, minimal });
        self.probe.choosing.pop();
        self.probe.leave();
        let value = value?;
        if let (false, Some(variant)) = (minimal, variant) {
            if let Some(slot) = self.probe.enums.get_mut(name).and_then(|e| e.variants.get_mut(index)) {
                slot.get_or_insert(variant);
            }
        }
        Ok(value)
    }
}

/// Hands a visitor one probe per slot: the elements of a sequence, tuple or struct, or a map's key and value.
struct Elements<'a> {
    probe: &'a mut Probe,
    slots: std::slice::IterMut<'a, Shape>,
    minimal: bool,
}

impl Elements<'_> {
    fn next_probe(&mut self) -> Probing<'_> {
        // A newtype always has its one slot; an empty one would be a bug in `named`.
        let out = self.slots.next().expect("a slot for the newtype's field");
        Probing { probe: &mut *self.probe, out, minimal: self.minimal }
    }
}

impl de::SeqAccess<'static> for Elements<'_> {
    type Error = TraceError;

    fn next_element_seed<S: DeserializeSeed<'static>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, TraceError> {
        match self.slots.next() {
            Some(out) => {
                seed.deserialize(Probing { probe: &mut *self.probe, out, minimal: self.minimal }).map(Some)
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.slots.len())
    }
}

impl de::MapAccess<'static> for Elements<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'static>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        de::SeqAccess::next_element_seed(self, seed)
    }

    fn next_value_seed<S: DeserializeSeed<'static>>(&mut self, seed: S) -> Result<S::Value, TraceError> {
        de::SeqAccess::next_element_seed(self, seed)?
            .ok_or_else(|| TraceError("a map value without a key".into()))
    }
}

/// One enum variant, picked by index, whose shape lands in `variant`.
struct Choice<'a> {
    probe: &'a mut Probe,
    index: usize,
    variant: &'a mut Option<Variant>,
    minimal: bool,
}

impl<'a> de::EnumAccess<'static> for Choice<'a> {
    type Error = TraceError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'static>>(self, seed: S) -> Result<(S::Value, Self), TraceError> {
        let index = u32::try_from(self.index).map_err(|_| TraceError("too many variants".into()))?;
        let deserializer: de::value::U32Deserializer<TraceError> = index.into_deserializer();
        Ok((seed.deserialize(deserializer)?, self))
    }
}

impl<'a> de::VariantAccess<'static> for Choice<'a> {
    type Error = TraceError;

    fn unit_variant(self) -> Result<(), TraceError> {
        *self.variant = Some(Variant::Unit);
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'static>>(self, seed: S) -> Result<S::Value, TraceError> {
        let mut shape = Shape::Unknown;
        let value =
            seed.deserialize(Probing { probe: self.probe, out: &mut shape, minimal: self.minimal })?;
        *self.variant = Some(Variant::Newtype(shape));
        Ok(value)
    }

    fn tuple_variant<V: Visitor<'static>>(self, len: usize, visitor: V) -> Result<V::Value, TraceError> {
        let mut slots = vec![Shape::Unknown; len];
        let elements = Elements { probe: self.probe, slots: slots.iter_mut(), minimal: self.minimal };
        let value = visitor.visit_seq(elements)?;
        *self.variant = Some(Variant::Tuple(slots));
        Ok(value)
    }

    fn struct_variant<V: Visitor<'static>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut slots = vec![Shape::Unknown; fields.len()];
        let elements = Elements { probe: self.probe, slots: slots.iter_mut(), minimal: self.minimal };
        let value = visitor.visit_seq(elements)?;
        *self.variant = Some(Variant::Struct(fields.iter().copied().zip(slots).collect()));
        Ok(value)
    }
}

/// Why a type could not be traced; it is then fingerprinted by name.
#[derive(Debug)]
struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traced<T: Deserialize<'static>>() -> Traced {
        trace::<T>().unwrap_or_else(|e| panic!("{}: {e}", std::any::type_name::<T>()))
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Kind {
        A(u8),
        B { x: f64 },
        C,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Outer {
        first: Kind,
        second: Option<Kind>,
        by_name: HashMap<String, Kind>,
        pair: (u8, Kind),
    }

    #[test]
    fn every_variant_of_a_nested_enum_is_traced() {
        let t = traced::<Outer>();
        let kinds = &t.enums["Kind"];
        assert_eq!(kinds.iter().map(|(name, _)| *name).collect::<Vec<_>>(), ["A", "B", "C"]);
        assert!(
            matches!(kinds[1].1, Some(Variant::Struct(ref f)) if f[0].0 == "x" && matches!(f[0].1, Shape::F64))
        );
        assert!(matches!(t.containers["Outer"], Container::Struct(ref f) if f.len() == 4));
    }

    mod v1 {
        #[allow(dead_code)]
        #[derive(serde::Deserialize)]
        pub enum Kind {
            A(u8),
            B { x: f64 },
        }
    }
    mod v2 {
        #[allow(dead_code)]
        #[derive(serde::Deserialize)]
        pub enum Kind {
            A(u8),
            B { x: f32 },
        }
    }

    #[test]
    fn a_retyped_field_inside_a_later_variant_changes_the_fingerprint() {
        assert_ne!(compute::<Option<v1::Kind>>(), compute::<Option<v2::Kind>>());
    }

    /// The first variant recurses: a tracer that always tries it first never ends.
    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Expr {
        Add(Box<Expr>, Box<Expr>),
        Lit(i64),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Tree {
        name: String,
        children: Vec<Tree>,
        parent: Option<Box<Tree>>,
        expr: Expr,
    }

    #[test]
    fn recursive_types_trace() {
        let t = traced::<Tree>();
        assert!(matches!(t.root, Shape::Named("Tree")));
        assert!(t.enums["Expr"].iter().all(|(_, v)| v.is_some()));
        assert!(
            matches!(t.enums["Expr"][0].1, Some(Variant::Tuple(ref s)) if matches!(s[..], [Shape::Named("Expr"), Shape::Named("Expr")]))
        );
    }

    /// Only infinite values have this shape: it can't be traced, and must not overflow the stack.
    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Endless(Box<Endless>);

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Spiral {
        In(Box<Spiral>),
    }

    #[test]
    fn types_that_cant_be_traced_are_fingerprinted_by_name() {
        fn by_name<T>() -> u64 {
            xxhash_rust::xxh3::xxh3_64(format!("name:{}", std::any::type_name::<T>()).as_bytes())
        }
        assert!(trace::<serde_json::Value>().is_err());
        assert!(trace::<std::num::NonZeroU32>().is_err());
        assert!(trace::<Endless>().is_err());
        assert!(trace::<Spiral>().is_err());
        assert_eq!(compute::<serde_json::Value>(), by_name::<serde_json::Value>());
        assert_eq!(compute::<Endless>(), by_name::<Endless>());
        assert_eq!(of::<std::num::NonZeroU32>(), by_name::<std::num::NonZeroU32>());
    }

    #[test]
    fn borrowed_and_owned_forms_share_a_shape() {
        assert_eq!(compute::<&str>(), compute::<String>());
        assert_eq!(compute::<Vec<&str>>(), compute::<Vec<String>>());
        assert_eq!(compute::<std::borrow::Cow<'static, str>>(), compute::<String>());
    }
}
