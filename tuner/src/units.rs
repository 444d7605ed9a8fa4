//! Typed quantities with their units in their types.
//!
//! Purpose: time in the tuner is an *input* ([`Tick`], microseconds on a
//! clock the caller owns), never read from the wall clock, so every policy and
//! the executor are replayable. Durations are [`Micros`]; shares are
//! [`Permille`]; the canary's traffic share is a [`CanaryFraction`].
//!
//! Invariants: every constructor that can be handed an out-of-range value
//! (`Permille::new`, `CanaryFraction::new`, `Probability::new`) checks it and
//! returns [`TunerError::OutOfRange`]; the inner fields of range-limited types
//! are private so an unchecked value cannot be built outside this module
//! (deserialisation goes through the same checks via `try_from`).

use serde::{Deserialize, Serialize};

use crate::error::TunerError;

/// A point in time: microseconds since an epoch chosen by the caller.
///
/// The tuner never reads a clock; each input carries its `Tick`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tick(pub u64);

impl Tick {
    /// Time elapsed since `earlier` (zero if `earlier` is in the future).
    pub fn since(self, earlier: Tick) -> Micros {
        Micros(self.0.saturating_sub(earlier.0))
    }

    /// This tick plus a duration (saturating).
    pub fn plus(self, d: Micros) -> Tick {
        Tick(self.0.saturating_add(d.0))
    }
}

/// A duration in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Micros(pub u64);

impl Micros {
    /// Whole milliseconds.
    pub const fn from_millis(ms: u64) -> Micros {
        Micros(ms * 1_000)
    }

    /// Whole seconds.
    pub const fn from_secs(s: u64) -> Micros {
        Micros(s * 1_000_000)
    }

    /// As fractional seconds.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bytes(pub u64);

/// A temperature in tenths of a degree Celsius.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeciCelsius(pub i16);

/// A power draw in milliwatts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Milliwatts(pub u32);

/// A clock frequency in megahertz.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mhz(pub u32);

/// A share in thousandths, 0..=1000.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct Permille(u16);

impl Permille {
    /// 100 %.
    pub const FULL: Permille = Permille(1000);
    /// 0 %.
    pub const ZERO: Permille = Permille(0);

    /// A share in thousandths; errors above 1000.
    pub fn new(v: u16) -> Result<Permille, TunerError> {
        if v > 1000 {
            return Err(TunerError::OutOfRange {
                what: "Permille",
                value: f64::from(v),
                lo: 0.0,
                hi: 1000.0,
                unit: "‰",
            });
        }
        Ok(Permille(v))
    }

    /// The share of `part` in `whole`, rounded down and saturating at 1000
    /// (0 when `whole` is 0).
    pub fn ratio(part: u64, whole: u64) -> Permille {
        if whole == 0 {
            return Permille(0);
        }
        let v = (u128::from(part) * 1000 / u128::from(whole)).min(1000);
        Permille(v as u16)
    }

    /// The raw thousandths.
    pub fn get(self) -> u16 {
        self.0
    }

    /// As a fraction in [0, 1].
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 1000.0
    }
}

impl TryFrom<u16> for Permille {
    type Error = TunerError;
    fn try_from(v: u16) -> Result<Self, Self::Error> {
        Permille::new(v)
    }
}

impl From<Permille> for u16 {
    fn from(p: Permille) -> u16 {
        p.0
    }
}

/// The share of *new* requests routed to a canary: (0, 1000] ‰.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct CanaryFraction(u16);

impl CanaryFraction {
    /// All new requests.
    pub const FULL: CanaryFraction = CanaryFraction(1000);

    /// A canary share in thousandths; errors on 0 or above 1000.
    pub fn new(permille: u16) -> Result<CanaryFraction, TunerError> {
        if permille == 0 || permille > 1000 {
            return Err(TunerError::OutOfRange {
                what: "CanaryFraction",
                value: f64::from(permille),
                lo: 1.0,
                hi: 1000.0,
                unit: "‰",
            });
        }
        Ok(CanaryFraction(permille))
    }

    /// The raw thousandths.
    pub fn permille(self) -> u16 {
        self.0
    }

    /// As a fraction in (0, 1].
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 1000.0
    }

    /// Whether this routes every new request.
    pub fn is_full(self) -> bool {
        self.0 == 1000
    }
}

impl TryFrom<u16> for CanaryFraction {
    type Error = TunerError;
    fn try_from(v: u16) -> Result<Self, Self::Error> {
        CanaryFraction::new(v)
    }
}

impl From<CanaryFraction> for u16 {
    fn from(c: CanaryFraction) -> u16 {
        c.0
    }
}

/// A probability or confidence in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Probability(f64);

impl Probability {
    /// A probability; errors outside [0, 1] or on NaN.
    pub fn new(p: f64) -> Result<Probability, TunerError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(TunerError::OutOfRange { what: "Probability", value: p, lo: 0.0, hi: 1.0, unit: "" });
        }
        Ok(Probability(p))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Probability {
    type Error = TunerError;
    fn try_from(v: f64) -> Result<Self, Self::Error> {
        Probability::new(v)
    }
}

impl From<Probability> for f64 {
    fn from(p: Probability) -> f64 {
        p.0
    }
}

/// Serde helper for `f64` fields that may legitimately hold non-finite
/// values (adversarial proposals must still be logged): finite values are
/// JSON numbers, NaN and infinities are the strings `"NaN"`, `"inf"`, `"-inf"`.
pub(crate) mod serde_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) => match s.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(serde::de::Error::custom("expected a number, NaN, inf or -inf")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permille_range_checked() {
        assert!(Permille::new(1000).is_ok());
        assert!(Permille::new(1001).is_err());
        assert_eq!(Permille::ratio(1, 3).get(), 333);
        assert_eq!(Permille::ratio(5, 0).get(), 0);
        assert_eq!(Permille::ratio(9, 3).get(), 1000);
        assert!(serde_json::from_str::<Permille>("1200").is_err());
    }

    #[test]
    fn canary_fraction_range_checked() {
        assert!(CanaryFraction::new(0).is_err());
        assert!(CanaryFraction::new(1001).is_err());
        assert!(CanaryFraction::new(50).is_ok());
        assert!(CanaryFraction::FULL.is_full());
        assert!(serde_json::from_str::<CanaryFraction>("0").is_err());
    }

    #[test]
    fn probability_range_checked() {
        assert!(Probability::new(f64::NAN).is_err());
        assert!(Probability::new(-0.1).is_err());
        assert!(Probability::new(1.0).is_ok());
    }

    #[test]
    fn tick_arithmetic_saturates() {
        assert_eq!(Tick(5).since(Tick(9)), Micros(0));
        assert_eq!(Tick(u64::MAX).plus(Micros(1)), Tick(u64::MAX));
    }

    #[test]
    fn non_finite_round_trips() {
        #[derive(Serialize, Deserialize)]
        struct W(#[serde(with = "serde_f64")] f64);
        for v in [1.5, f64::INFINITY, f64::NEG_INFINITY] {
            let s = serde_json::to_string(&W(v)).unwrap();
            assert_eq!(serde_json::from_str::<W>(&s).unwrap().0, v);
        }
        let s = serde_json::to_string(&W(f64::NAN)).unwrap();
        assert!(serde_json::from_str::<W>(&s).unwrap().0.is_nan());
    }
}
