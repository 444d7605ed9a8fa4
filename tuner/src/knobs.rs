//! The typed knob space and the [`Config`] snapshot that serving reads.
//!
//! Purpose: describe *what* may be tuned (a [`KnobSpace`] of at most
//! [`MAX_KNOBS`] [`KnobSpec`]s, each continuous, integer or categorical, with
//! bounds and a [`Unit`]) and *the value of everything* at one moment (a
//! [`Config`]: the serving variant plus one [`KnobValue`] per knob).
//! Optimisers work in the unit cube; [`KnobSpec::normalise`] and
//! [`KnobSpec::denormalise`] (and [`KnobSpace::patch_from_unit`]) are the bridge. A [`Patch`] is a sparse change
//! proposed against a config.
//!
//! Usage: build a space once (for the runtime's knobs see
//! [`crate::serving::serving_space`]), take `space.defaults()` as the first
//! baseline, and let the executor produce every later `Config`.
//!
//! Invariants: a space's specs have finite bounds with `lo < hi`, defaults
//! inside them, and unique names (checked on construction *and* on
//! deserialisation). `Config`, `KnobValues` and `Patch` are `Copy` and
//! fixed-size so the executor's hot path never allocates.

use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::units::serde_f64;

/// The most knobs one space may hold (fixed so configs are `Copy`).
pub const MAX_KNOBS: usize = 16;

/// Index of a knob in its [`KnobSpace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KnobId(pub u8);

impl KnobId {
    /// As an array index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A serving variant (a model build: quantisation, adapter, kernel plan), by
/// its index in the runtime's catalog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VariantId(pub u16);

/// The unit a knob is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unit {
    /// Microseconds.
    Micros,
    /// Tokens.
    Tokens,
    /// Requests.
    Requests,
    /// Thousandths of a whole.
    Permille,
    /// A plain count.
    Count,
    /// A dimensionless ratio.
    Ratio,
}

impl Unit {
    /// Short symbol for reports.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::Tokens => "tokens",
            Unit::Requests => "requests",
            Unit::Permille => "‰",
            Unit::Count => "count",
            Unit::Ratio => "ratio",
        }
    }
}

/// The set of values a knob may take.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Domain {
    /// A real value in `[lo, hi]`.
    Continuous {
        /// Inclusive lower bound.
        lo: f64,
        /// Inclusive upper bound.
        hi: f64,
    },
    /// An integer in `[lo, hi]`.
    Integer {
        /// Inclusive lower bound.
        lo: i64,
        /// Inclusive upper bound.
        hi: i64,
    },
    /// One of `choices` unordered options, `0..choices`.
    Categorical {
        /// Number of options (at least 2).
        choices: u16,
    },
}

/// A knob's value. The variant must match the knob's [`Domain`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum KnobValue {
    /// For [`Domain::Continuous`]. May be non-finite in an (adversarial)
    /// proposal; the executor rejects those.
    Continuous(#[serde(with = "serde_f64")] f64),
    /// For [`Domain::Integer`].
    Integer(i64),
    /// For [`Domain::Categorical`].
    Categorical(u16),
}

impl KnobValue {
    /// The value as f64 (categorical: the option index).
    pub fn as_f64(self) -> f64 {
        match self {
            KnobValue::Continuous(v) => v,
            KnobValue::Integer(v) => v as f64,
            KnobValue::Categorical(c) => f64::from(c),
        }
    }
}

/// One knob: its name, unit, domain and default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnobSpec {
    /// Stable name (used in reports and the audit log).
    pub name: String,
    /// Unit of the values.
    pub unit: Unit,
    /// Allowed values.
    pub domain: Domain,
    /// Value used by the first baseline.
    pub default: KnobValue,
}

impl KnobSpec {
    /// A continuous knob on `[lo, hi]`.
    pub fn continuous(name: &str, unit: Unit, lo: f64, hi: f64, default: f64) -> Result<KnobSpec, TunerError> {
        let spec = KnobSpec {
            name: name.to_owned(),
            unit,
            domain: Domain::Continuous { lo, hi },
            default: KnobValue::Continuous(default),
        };
        spec.check()?;
        Ok(spec)
    }

    /// An integer knob on `[lo, hi]`.
    pub fn integer(name: &str, unit: Unit, lo: i64, hi: i64, default: i64) -> Result<KnobSpec, TunerError> {
        let spec = KnobSpec {
            name: name.to_owned(),
            unit,
            domain: Domain::Integer { lo, hi },
            default: KnobValue::Integer(default),
        };
        spec.check()?;
        Ok(spec)
    }

    /// A categorical knob with `choices` options.
    pub fn categorical(name: &str, choices: u16, default: u16) -> Result<KnobSpec, TunerError> {
        let spec = KnobSpec {
            name: name.to_owned(),
            unit: Unit::Count,
            domain: Domain::Categorical { choices },
            default: KnobValue::Categorical(default),
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), TunerError> {
        let ok_domain = match self.domain {
            Domain::Continuous { lo, hi } => lo.is_finite() && hi.is_finite() && lo < hi,
            Domain::Integer { lo, hi } => lo < hi,
            Domain::Categorical { choices } => choices >= 2,
        };
        if !ok_domain {
            return Err(TunerError::config("KnobSpec", format!("knob {:?}: empty or non-finite domain", self.name)));
        }
        if !self.contains(self.default) {
            return Err(TunerError::config("KnobSpec", format!("knob {:?}: default outside its domain", self.name)));
        }
        Ok(())
    }

    /// Whether `v` has the right kind and lies inside the domain (NaN never does).
    pub fn contains(&self, v: KnobValue) -> bool {
        match (self.domain, v) {
            (Domain::Continuous { lo, hi }, KnobValue::Continuous(x)) => x >= lo && x <= hi,
            (Domain::Integer { lo, hi }, KnobValue::Integer(x)) => x >= lo && x <= hi,
            (Domain::Categorical { choices }, KnobValue::Categorical(c)) => c < choices,
            _ => false,
        }
    }

    /// Whether `v` is of the kind this knob takes (bounds not checked).
    pub fn same_kind(&self, v: KnobValue) -> bool {
        matches!(
            (self.domain, v),
            (Domain::Continuous { .. }, KnobValue::Continuous(_))
                | (Domain::Integer { .. }, KnobValue::Integer(_))
                | (Domain::Categorical { .. }, KnobValue::Categorical(_))
        )
    }

    /// Maps a value into [0, 1] (categorical: the centre of its cell).
    pub fn normalise(&self, v: KnobValue) -> f64 {
        let u = match (self.domain, v) {
            (Domain::Continuous { lo, hi }, _) => (v.as_f64() - lo) / (hi - lo),
            (Domain::Integer { lo, hi }, _) => (v.as_f64() - lo as f64) / (hi - lo) as f64,
            (Domain::Categorical { choices }, _) => (v.as_f64() + 0.5) / f64::from(choices),
        };
        if u.is_nan() {
            0.0
        } else {
            u.clamp(0.0, 1.0)
        }
    }

    /// Maps `u` (clamped into [0, 1]; NaN reads as 0) back to a value in the domain.
    pub fn denormalise(&self, u: f64) -> KnobValue {
        let u = if u.is_nan() { 0.0 } else { u.clamp(0.0, 1.0) };
        match self.domain {
            Domain::Continuous { lo, hi } => KnobValue::Continuous((lo + u * (hi - lo)).min(hi)),
            Domain::Integer { lo, hi } => {
                let v = lo as f64 + u * (hi - lo) as f64;
                KnobValue::Integer((v.round() as i64).clamp(lo, hi))
            }
            Domain::Categorical { choices } => {
                let c = (u * f64::from(choices)).floor() as u16;
                KnobValue::Categorical(c.min(choices - 1))
            }
        }
    }

    /// Clamps a same-kind value into the domain; `None` for NaN or a kind mismatch.
    pub fn clamp(&self, v: KnobValue) -> Option<KnobValue> {
        match (self.domain, v) {
            (Domain::Continuous { lo, hi }, KnobValue::Continuous(x)) if !x.is_nan() => {
                Some(KnobValue::Continuous(x.clamp(lo, hi)))
            }
            (Domain::Integer { lo, hi }, KnobValue::Integer(x)) => Some(KnobValue::Integer(x.clamp(lo, hi))),
            (Domain::Categorical { choices }, KnobValue::Categorical(c)) if c < choices => Some(v),
            _ => None,
        }
    }
}

/// An ordered set of at most [`MAX_KNOBS`] knobs with unique names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<KnobSpec>", into = "Vec<KnobSpec>")]
pub struct KnobSpace {
    specs: Vec<KnobSpec>,
}

impl KnobSpace {
    /// A space from its specs; errors on more than [`MAX_KNOBS`] knobs,
    /// duplicate names or an invalid spec.
    pub fn new(specs: Vec<KnobSpec>) -> Result<KnobSpace, TunerError> {
        if specs.len() > MAX_KNOBS {
            return Err(TunerError::config("KnobSpace", format!("{} knobs, at most {MAX_KNOBS}", specs.len())));
        }
        for (i, s) in specs.iter().enumerate() {
            s.check()?;
            if specs[..i].iter().any(|o| o.name == s.name) {
                return Err(TunerError::config("KnobSpace", format!("duplicate knob name {:?}", s.name)));
            }
        }
        Ok(KnobSpace { specs })
    }

    /// A space of `n` continuous knobs `x0..x{n-1}` on [0, 1] (simulations, benches).
    pub fn unit_cube(n: usize) -> Result<KnobSpace, TunerError> {
        let specs = (0..n)
            .map(|i| KnobSpec::continuous(&format!("x{i}"), Unit::Ratio, 0.0, 1.0, 0.5))
            .collect::<Result<Vec<_>, _>>()?;
        KnobSpace::new(specs)
    }

    /// Number of knobs.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the space has no knobs.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The spec of `id`, if it exists.
    pub fn spec(&self, id: KnobId) -> Option<&KnobSpec> {
        self.specs.get(id.index())
    }

    /// All specs in id order.
    pub fn specs(&self) -> &[KnobSpec] {
        &self.specs
    }

    /// The id of the knob called `name`.
    pub fn id_of(&self, name: &str) -> Option<KnobId> {
        self.specs.iter().position(|s| s.name == name).map(|i| KnobId(i as u8))
    }

    /// Every knob at its default.
    pub fn defaults(&self) -> KnobValues {
        let mut v = KnobValues::empty();
        for s in &self.specs {
            v.push(s.default);
        }
        v
    }

    /// Writes `values` normalised into `out[..len]` (allocation-free).
    pub fn normalise_into(&self, values: &KnobValues, out: &mut [f64]) {
        for (i, s) in self.specs.iter().enumerate() {
            if let (Some(v), Some(o)) = (values.get(KnobId(i as u8)), out.get_mut(i)) {
                *o = s.normalise(v);
            }
        }
    }

    /// A patch setting every knob from the unit-cube point `u` (missing
    /// coordinates leave knobs untouched).
    pub fn patch_from_unit(&self, u: &[f64]) -> Patch {
        let mut p = Patch::default();
        for (i, (s, &x)) in self.specs.iter().zip(u).enumerate() {
            p.set(KnobId(i as u8), s.denormalise(x));
        }
        p
    }
}

impl TryFrom<Vec<KnobSpec>> for KnobSpace {
    type Error = TunerError;
    fn try_from(v: Vec<KnobSpec>) -> Result<Self, Self::Error> {
        KnobSpace::new(v)
    }
}

impl From<KnobSpace> for Vec<KnobSpec> {
    fn from(s: KnobSpace) -> Self {
        s.specs
    }
}

/// One value per knob of a space, fixed-size and `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<KnobValue>", into = "Vec<KnobValue>")]
pub struct KnobValues {
    len: u8,
    vals: [KnobValue; MAX_KNOBS],
}

impl KnobValues {
    /// No values.
    pub fn empty() -> KnobValues {
        KnobValues { len: 0, vals: [KnobValue::Integer(0); MAX_KNOBS] }
    }

    /// Appends a value (ignored past [`MAX_KNOBS`], which a space cannot exceed).
    pub fn push(&mut self, v: KnobValue) {
        if usize::from(self.len) < MAX_KNOBS {
            self.vals[usize::from(self.len)] = v;
            self.len += 1;
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of knob `id`.
    pub fn get(&self, id: KnobId) -> Option<KnobValue> {
        self.as_slice().get(id.index()).copied()
    }

    /// Sets knob `id` if it exists; returns whether it did.
    pub fn set(&mut self, id: KnobId, v: KnobValue) -> bool {
        if id.index() < self.len() {
            self.vals[id.index()] = v;
            true
        } else {
            false
        }
    }

    /// The values in knob order.
    pub fn as_slice(&self) -> &[KnobValue] {
        &self.vals[..self.len()]
    }
}

impl TryFrom<Vec<KnobValue>> for KnobValues {
    type Error = TunerError;
    fn try_from(v: Vec<KnobValue>) -> Result<Self, Self::Error> {
        if v.len() > MAX_KNOBS {
            return Err(TunerError::config("KnobValues", "more than MAX_KNOBS values"));
        }
        let mut out = KnobValues::empty();
        for x in v {
            out.push(x);
        }
        Ok(out)
    }
}

impl From<KnobValues> for Vec<KnobValue> {
    fn from(v: KnobValues) -> Self {
        v.as_slice().to_vec()
    }
}

/// What serving reads: the variant and every knob's value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The model variant serving new requests.
    pub variant: VariantId,
    /// One value per knob of the executor's space.
    pub knobs: KnobValues,
}

impl Config {
    /// The defaults of `space` on `variant`.
    pub fn defaults(space: &KnobSpace, variant: VariantId) -> Config {
        Config { variant, knobs: space.defaults() }
    }

    /// This config with `patch` applied verbatim (no checks: the executor
    /// validates patches before building candidates).
    pub fn with_patch(&self, patch: &Patch) -> Config {
        let mut c = *self;
        if let Some(v) = patch.variant {
            c.variant = v;
        }
        for (id, v) in patch.iter() {
            c.knobs.set(id, v);
        }
        c
    }
}

/// A sparse proposed change: an optional variant and optional knob values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PatchRepr", into = "PatchRepr")]
pub struct Patch {
    /// A new variant, if the change is structural.
    pub variant: Option<VariantId>,
    knobs: [Option<KnobValue>; MAX_KNOBS],
}

impl Patch {
    /// A patch that only changes the variant.
    pub fn variant(v: VariantId) -> Patch {
        Patch { variant: Some(v), ..Patch::default() }
    }

    /// A patch setting one knob.
    pub fn knob(id: KnobId, v: KnobValue) -> Patch {
        let mut p = Patch::default();
        p.set(id, v);
        p
    }

    /// Sets knob `id`; ids at or past [`MAX_KNOBS`] are ignored and reported
    /// as `false` (the executor separately rejects ids outside its space).
    pub fn set(&mut self, id: KnobId, v: KnobValue) -> bool {
        match self.knobs.get_mut(id.index()) {
            Some(slot) => {
                *slot = Some(v);
                true
            }
            None => false,
        }
    }

    /// The proposed value of knob `id`.
    pub fn get(&self, id: KnobId) -> Option<KnobValue> {
        self.knobs.get(id.index()).copied().flatten()
    }

    /// The knobs this patch sets, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (KnobId, KnobValue)> + '_ {
        self.knobs.iter().enumerate().filter_map(|(i, v)| v.map(|v| (KnobId(i as u8), v)))
    }

    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.variant.is_none() && self.knobs.iter().all(Option::is_none)
    }

    /// Whether the patch sets any knob.
    pub fn touches_knobs(&self) -> bool {
        self.knobs.iter().any(Option::is_some)
    }
}

#[derive(Serialize, Deserialize)]
struct PatchRepr {
    variant: Option<VariantId>,
    knobs: Vec<(KnobId, KnobValue)>,
}

impl From<Patch> for PatchRepr {
    fn from(p: Patch) -> Self {
        PatchRepr { variant: p.variant, knobs: p.iter().collect() }
    }
}

impl TryFrom<PatchRepr> for Patch {
    type Error = TunerError;
    fn try_from(r: PatchRepr) -> Result<Self, Self::Error> {
        let mut p = Patch { variant: r.variant, ..Patch::default() };
        for (id, v) in r.knobs {
            if !p.set(id, v) {
                return Err(TunerError::config("Patch", "knob id past MAX_KNOBS"));
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_rejects_bad_domains_and_defaults() {
        assert!(KnobSpec::continuous("a", Unit::Ratio, 1.0, 0.0, 0.5).is_err());
        assert!(KnobSpec::continuous("a", Unit::Ratio, 0.0, f64::INFINITY, 0.5).is_err());
        assert!(KnobSpec::continuous("a", Unit::Ratio, 0.0, 1.0, 2.0).is_err());
        assert!(KnobSpec::integer("b", Unit::Tokens, 5, 5, 5).is_err());
        assert!(KnobSpec::categorical("c", 1, 0).is_err());
        assert!(KnobSpec::categorical("c", 3, 3).is_err());
    }

    #[test]
    fn space_rejects_duplicates_and_too_many() {
        let a = KnobSpec::continuous("a", Unit::Ratio, 0.0, 1.0, 0.5).unwrap();
        assert!(KnobSpace::new(vec![a.clone(), a]).is_err());
        assert!(KnobSpace::unit_cube(MAX_KNOBS + 1).is_err());
        assert_eq!(KnobSpace::unit_cube(MAX_KNOBS).unwrap().len(), MAX_KNOBS);
    }

    #[test]
    fn normalise_round_trips() {
        let c = KnobSpec::continuous("c", Unit::Micros, 100.0, 300.0, 200.0).unwrap();
        assert_eq!(c.normalise(KnobValue::Continuous(150.0)), 0.25);
        assert_eq!(c.denormalise(0.25), KnobValue::Continuous(150.0));
        assert_eq!(c.denormalise(f64::NAN), KnobValue::Continuous(100.0));
        let i = KnobSpec::integer("i", Unit::Tokens, 0, 10, 5).unwrap();
        assert_eq!(i.denormalise(0.34), KnobValue::Integer(3));
        assert_eq!(i.denormalise(7.0), KnobValue::Integer(10));
        let k = KnobSpec::categorical("k", 4, 0).unwrap();
        for c in 0..4 {
            let u = k.normalise(KnobValue::Categorical(c));
            assert_eq!(k.denormalise(u), KnobValue::Categorical(c));
        }
        assert_eq!(k.denormalise(1.0), KnobValue::Categorical(3));
    }

    #[test]
    fn clamp_and_kind_checks() {
        let c = KnobSpec::continuous("c", Unit::Ratio, 0.0, 1.0, 0.5).unwrap();
        assert_eq!(c.clamp(KnobValue::Continuous(3.0)), Some(KnobValue::Continuous(1.0)));
        assert_eq!(c.clamp(KnobValue::Continuous(f64::NAN)), None);
        assert_eq!(c.clamp(KnobValue::Integer(0)), None);
        assert!(!c.contains(KnobValue::Continuous(f64::NAN)));
    }

    #[test]
    fn patch_and_config_serde_round_trip() {
        let space = KnobSpace::unit_cube(3).unwrap();
        let base = Config::defaults(&space, VariantId(1));
        let mut p = Patch::variant(VariantId(2));
        p.set(KnobId(1), KnobValue::Continuous(0.75));
        assert!(!p.set(KnobId(40), KnobValue::Continuous(0.1)));
        let c = base.with_patch(&p);
        assert_eq!(c.variant, VariantId(2));
        assert_eq!(c.knobs.get(KnobId(1)), Some(KnobValue::Continuous(0.75)));
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Patch>(&s).unwrap(), p);
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&s).unwrap(), c);
        let s = serde_json::to_string(&space).unwrap();
        assert_eq!(serde_json::from_str::<KnobSpace>(&s).unwrap(), space);
    }
}
