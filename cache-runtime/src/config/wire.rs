//! The types settings are read as: each checks its value, so a section that
//! deserializes is valid, whichever format or environment variable it came from.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, IntoDeserializer, Unexpected, Visitor};

use super::{Secret, TextRule};
use crate::CacheError;

/// A checked setting and the value it leaves in the config.
pub(super) trait Wire: de::DeserializeOwned {
    type Value;
    fn value(self) -> Self::Value;
}

/// Reads an environment variable through the same checks as the settings
/// section; the value shown in an error is the variable's text.
pub(super) fn from_env<W: Wire>(name: &str, text: &str) -> Result<W, CacheError> {
    let text_de: de::value::StrDeserializer<'_, de::value::Error> = text.into_deserializer();
    W::deserialize(text_de).map_err(|e| CacheError::config(name, text, e.to_string()))
}

/// `null` or absent is `None`; anything else must read as `W`.
pub(super) fn optional<'de, W: Wire, D: Deserializer<'de>>(d: D) -> Result<Option<W::Value>, D::Error> {
    Ok(Option::<W>::deserialize(d)?.map(W::value))
}

/// Seconds as a number (`5`, `0.25`) or as text (`"30"`, from the environment
/// or a loader that keeps strings), positive and finite.
pub(super) struct Secs(Duration);

impl Wire for Secs {
    type Value = Duration;
    fn value(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecsVisitor;
        impl SecsVisitor {
            fn secs<E: de::Error>(self, secs: f64, shown: Unexpected<'_>) -> Result<Secs, E> {
                if secs.is_finite() && secs > 0.0 && secs < 1e12 {
                    Ok(Secs(Duration::from_secs_f64(secs)))
                } else {
                    Err(E::invalid_value(shown, &self))
                }
            }
        }
        impl Visitor<'_> for SecsVisitor {
            type Value = Secs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secs, E> {
                self.secs(v as f64, Unexpected::Unsigned(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Secs, E> {
                self.secs(v as f64, Unexpected::Signed(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Secs, E> {
                self.secs(v, Unexpected::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secs, E> {
                match v.trim().parse::<f64>() {
                    Ok(secs) => self.secs(secs, Unexpected::Str(v)),
                    Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(SecsVisitor)
    }
}

/// `true`/`false`, or as text also `yes`/`no`, `on`/`off`, `1`/`0` (as the
/// environment writes them).
pub(super) struct Flag(bool);

impl Wire for Flag {
    type Value = bool;
    fn value(self) -> bool {
        self.0
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => Ok(Flag(true)),
                    "0" | "false" | "no" | "off" => Ok(Flag(false)),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(FlagVisitor)
    }
}

/// `true`, `false`, or `auto` (also `null`): the cache decides.
pub(super) struct AutoFlag(Option<bool>);

impl Wire for AutoFlag {
    type Value = Option<bool>;
    fn value(self) -> Option<bool> {
        self.0
    }
}

impl<'de> Deserialize<'de> for AutoFlag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AutoVisitor;
        impl Visitor<'_> for AutoVisitor {
            type Value = AutoFlag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AutoFlag, E> {
                Ok(AutoFlag(Some(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<AutoFlag, E> {
                Ok(AutoFlag(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<AutoFlag, E> {
                Ok(AutoFlag(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AutoFlag, E> {
                if v.trim().eq_ignore_ascii_case("auto") {
                    return Ok(AutoFlag(None));
                }
                let text: de::value::StrDeserializer<'_, E> = v.into_deserializer();
                Flag::deserialize(text)
                    .map(|f| AutoFlag(Some(f.0)))
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(AutoVisitor)
    }
}

/// A whole number of at least 1 that fits `T`; numeric text is read too.
pub(super) struct Positive<T>(T);

impl<T: TryFrom<u64>> Wire for Positive<T> {
    type Value = T;
    fn value(self) -> T {
        self.0
    }
}

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Positive<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PositiveVisitor<T>(PhantomData<T>);
        impl<T: TryFrom<u64>> Visitor<'_> for PositiveVisitor<T> {
            type Value = Positive<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a whole number from 1 to {}::MAX", std::any::type_name::<T>())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Positive<T>, E> {
                match T::try_from(v) {
                    Ok(n) if v > 0 => Ok(Positive(n)),
                    _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Positive<T>, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Positive<T>, E> {
                match v.trim().parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(PositiveVisitor(PhantomData))
    }
}

/// Seconds as [`Secs`] reads them, or `null` (or absent) for none.
pub(super) struct MaybeSecs(Option<Duration>);

impl Wire for MaybeSecs {
    type Value = Option<Duration>;
    fn value(self) -> Option<Duration> {
        self.0
    }
}

impl<'de> Deserialize<'de> for MaybeSecs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<Secs>::deserialize(d).map(|secs| MaybeSecs(secs.map(Wire::value)))
    }
}

/// A whole percentage, 0 to 100; numeric text is read too.
pub(super) struct Percent(u8);

impl Wire for Percent {
    type Value = u8;
    fn value(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PercentVisitor;
        impl Visitor<'_> for PercentVisitor {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole percentage from 0 to 100")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Percent, E> {
                match u8::try_from(v) {
                    Ok(n) if n <= 100 => Ok(Percent(n)),
                    _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Percent, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Percent, E> {
                match v.trim().trim_end_matches('%').trim().parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(PercentVisitor)
    }
}

/// A positive, finite factor (`1`, `0.5`, `"2"`), at most 100.
pub(super) struct Factor(f64);

impl Wire for Factor {
    type Value = f64;
    fn value(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FactorVisitor;
        impl FactorVisitor {
            fn factor<E: de::Error>(self, v: f64, shown: Unexpected<'_>) -> Result<Factor, E> {
                if v.is_finite() && v > 0.0 && v <= 100.0 {
                    Ok(Factor(v))
                } else {
                    Err(E::invalid_value(shown, &self))
                }
            }
        }
        impl Visitor<'_> for FactorVisitor {
            type Value = Factor;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive number, at most 100")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Factor, E> {
                self.factor(v as f64, Unexpected::Unsigned(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Factor, E> {
                self.factor(v as f64, Unexpected::Signed(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Factor, E> {
                self.factor(v, Unexpected::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Factor, E> {
                match v.trim().parse::<f64>() {
                    Ok(n) => self.factor(n, Unexpected::Str(v)),
                    Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(FactorVisitor)
    }
}

/// A text setting that follows the rule `R` names.
pub(super) struct Text<R>(String, PhantomData<R>);

/// Names a [`TextRule`] at the type level, for [`Text`].
pub(super) trait Rule {
    const RULE: TextRule;
}

impl<R: Rule> Wire for Text<R> {
    type Value = String;
    fn value(self) -> String {
        self.0
    }
}

impl<'de, R: Rule> Deserialize<'de> for Text<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if (R::RULE.ok)(&text) {
            Ok(Text(text, PhantomData))
        } else {
            Err(de::Error::invalid_value(Unexpected::Str(&text), &R::RULE.rule))
        }
    }
}

/// The rule of a key prefix.
pub(super) enum PrefixRule {}

impl Rule for PrefixRule {
    const RULE: TextRule = super::PREFIX;
}

/// The rule of a Prometheus metric namespace.
pub(super) enum NamespaceRule {}

impl Rule for NamespaceRule {
    const RULE: TextRule = super::NAMESPACE;
}

/// A key prefix: non-empty, without `:`, `#`, spaces or glob characters.
pub(super) type Prefix = Text<PrefixRule>;

/// A Prometheus metric namespace.
pub(super) type Namespace = Text<NamespaceRule>;

impl Wire for crate::Serialization {
    type Value = Self;
    fn value(self) -> Self {
        self
    }
}

/// A password or token: a string, or `null` for none. Its value never enters
/// an error message, where a log would keep it.
pub(super) struct MaybeSecret(pub(super) Option<Secret>);

impl Wire for MaybeSecret {
    type Value = Option<Secret>;
    fn value(self) -> Option<Secret> {
        self.0
    }
}

impl<'de> Deserialize<'de> for MaybeSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl SecretVisitor {
            fn refuse<E: de::Error>(self) -> Result<MaybeSecret, E> {
                Err(E::custom("expected a string (quote it in the settings file); the value is not shown"))
            }
        }
        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = MaybeSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, or null for none")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeSecret, E> {
                Ok(MaybeSecret(Some(Secret(v.to_owned()))))
            }
            fn visit_none<E: de::Error>(self) -> Result<MaybeSecret, E> {
                Ok(MaybeSecret(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeSecret, E> {
                Ok(MaybeSecret(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<MaybeSecret, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeSecret, E> {
                self.refuse()
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<MaybeSecret, E> {
                self.refuse()
            }
        }
        d.deserialize_option(SecretVisitor)
    }
}

/// A path to a file: a non-empty string, or `null` for none.
pub(super) struct MaybePath(Option<PathBuf>);

impl Wire for MaybePath {
    type Value = Option<PathBuf>;
    fn value(self) -> Option<PathBuf> {
        self.0
    }
}

impl<'de> Deserialize<'de> for MaybePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PathVisitor;
        impl<'de> Visitor<'de> for PathVisitor {
            type Value = MaybePath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path to a file, or null for none")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybePath, E> {
                if v.trim().is_empty() {
                    return Err(E::invalid_value(Unexpected::Str(v), &self));
                }
                Ok(MaybePath(Some(PathBuf::from(v))))
            }
            fn visit_none<E: de::Error>(self) -> Result<MaybePath, E> {
                Ok(MaybePath(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybePath, E> {
                Ok(MaybePath(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<MaybePath, D::Error> {
                d.deserialize_any(self)
            }
        }
        d.deserialize_option(PathVisitor)
    }
}

/// `host:port` addresses: a list, or one string of them separated by commas
/// (as `REDIS_SENTINELS` gives them). At least one.
pub(super) struct HostList(pub(super) Vec<String>);

impl Wire for HostList {
    type Value = Vec<String>;
    fn value(self) -> Vec<String> {
        self.0
    }
}

impl<'de> Deserialize<'de> for HostList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HostsVisitor;
        impl HostsVisitor {
            fn checked<E: de::Error>(self, hosts: Vec<String>) -> Result<HostList, E> {
                match hosts.iter().find(|h| !h.contains(':') || h.contains(['/', '@', ','])) {
                    Some(bad) => Err(E::invalid_value(Unexpected::Str(bad), &self)),
                    None if hosts.is_empty() => Err(E::invalid_length(0, &self)),
                    None => Ok(HostList(hosts)),
                }
            }
        }
        impl<'de> Visitor<'de> for HostsVisitor {
            type Value = HostList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`host:port` addresses, as a list or separated by commas")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HostList, E> {
                self.checked(
                    v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect(),
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<HostList, A::Error> {
                let mut hosts = Vec::new();
                while let Some(host) = seq.next_element::<String>()? {
                    hosts.push(host.trim().to_owned());
                }
                self.checked(hosts)
            }
        }
        d.deserialize_any(HostsVisitor)
    }
}

/// Key prefixes: a list, or one string of them separated by commas. Each is
/// non-empty and has no `:` and no glob characters. Possibly none.
pub(super) struct PrefixList(Vec<String>);

impl Wire for PrefixList {
    type Value = Vec<String>;
    fn value(self) -> Vec<String> {
        self.0
    }
}

impl<'de> Deserialize<'de> for PrefixList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PrefixesVisitor;
        impl PrefixesVisitor {
            fn checked<E: de::Error>(self, prefixes: Vec<String>) -> Result<PrefixList, E> {
                let bad = |p: &String| p.is_empty() || p.contains([':', '*', '?', '[', ']', '\\']);
                match prefixes.iter().find(|p| bad(p)) {
                    Some(bad) => Err(E::invalid_value(Unexpected::Str(bad), &self)),
                    None => Ok(PrefixList(prefixes)),
                }
            }
        }
        impl<'de> Visitor<'de> for PrefixesVisitor {
            type Value = PrefixList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("key prefixes without `:` or glob characters, as a list or separated by commas")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PrefixList, E> {
                self.checked(
                    v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect(),
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PrefixList, A::Error> {
                let mut prefixes = Vec::new();
                while let Some(prefix) = seq.next_element::<String>()? {
                    prefixes.push(prefix.trim().to_owned());
                }
                self.checked(prefixes)
            }
        }
        d.deserialize_any(PrefixesVisitor)
    }
}
