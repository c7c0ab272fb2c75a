//! Scales factored as the K-quants hold them: values as an f16 times signed bytes,
//! exactly or not at all ([`factor`]).

use half::f16;

/// `vals` as `D · n`, `D` an f16 and `n` in −128..128, exactly in f32 arithmetic (into
/// `n`); `None` where they are no such multiples (or not finite). First the largest `D`
/// whose multiples they can be (their odd significands' greatest common divisor at their
/// least exponent: a K-quant's 6-bit scales' `d` where one of them is odd), then, where
/// that is no f16 or leaves multiples past a byte, `a / top` for their largest magnitude
/// `a` and `top` from 1 up.
pub(super) fn factor(vals: &[f32], n: &mut [i8]) -> Option<f16> {
    let a = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !a.is_finite() {
        return None;
    }
    if a == 0.0 {
        n.fill(0);
        return Some(f16::ZERO);
    }
    // v = ±s · 2^e, s odd.
    let odd_parts = |v: f32| {
        let (bits, e) = (v.to_bits(), ((v.to_bits() >> 23) & 0xff) as i32);
        let sig = bits & 0x7f_ffff | if e > 0 { 0x80_0000 } else { 0 };
        let tz = sig.trailing_zeros();
        (sig >> tz, e.max(1) - 150 + tz as i32)
    };
    let (mut g, mut e) = (0u32, i32::MAX);
    for &v in vals.iter().filter(|v| **v != 0.0) {
        let (s, ev) = odd_parts(v);
        g = gcd(g, s);
        e = e.min(ev);
    }
    let d = (f64::from(g) * 2f64.powi(e)) as f32;
    if let Some(dh) = multiples_of(d, vals, n) {
        return Some(dh);
    }
    // D = a / top is an f16 only where top's odd part divides a's odd significand to
    // under 11 bits: a test in integers before the floats'.
    let (odd, _) = odd_parts(a);
    (1..=128u8)
        .filter(|top| {
            let t = u32::from(top >> top.trailing_zeros());
            odd.is_multiple_of(t) && odd / t < 1 << 11
        })
        .find_map(|top| multiples_of(a / f32::from(top), vals, n))
}

/// `d` as an f16, where it is one and every value is `d` times an integer in −128..128
/// exactly (into `n`).
fn multiples_of(d: f32, vals: &[f32], n: &mut [i8]) -> Option<f16> {
    let dh = f16::from_f32(d);
    if d == 0.0 || dh.to_f32() != d {
        return None;
    }
    for (v, n) in vals.iter().zip(n.iter_mut()) {
        let q = v / d;
        // Truncated: an integer quotient is exact, and d · (a byte) is exact in f32, so
        // the product is v only where q was that integer.
        if !(-128.0..128.0).contains(&q) || d * (q as i32) as f32 != *v {
            return None;
        }
        *n = q as i8;
    }
    Some(dh)
}

/// The greatest common divisor (0 with anything is that thing).
pub(super) fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::factor;
    use half::f16;

    /// Values that are an f16's multiples by signed bytes factor back into them exactly
    /// (a K-quant's `d · sc`, `−dmin · m`); others, or values f16 cannot hold as `D`, do
    /// not.
    #[test]
    fn scales_factor_exactly_or_not_at_all() {
        let mut n = [0i8; 8];
        let d = f16::from_f32(0.0123).to_f32();
        let sc = [63, 0, 17, -5, 1, 42, -128, 9];
        let vals = sc.map(|s| d * s as f32);
        let dh = factor(&vals, &mut n).expect("multiples of an f16");
        for (&v, &n) in vals.iter().zip(&n) {
            assert_eq!(dh.to_f32() * f32::from(n), v);
        }
        // Zeros (a row of padding), and a part of a super-block.
        assert_eq!(factor(&[0.0, -0.0], &mut n[..2]), Some(f16::ZERO));
        assert_eq!(n[..2], [0, 0]);
        assert!(factor(&vals[..3], &mut n[..3]).is_some());
        // Multiples 3 and 9 of 683/1024: their odd parts' divisor, 2,049, is no f16's; the
        // search from their largest finds 683/1024 (at 9).
        let x = 683.0 / 1024.0;
        assert_eq!(
            factor(&[3.0 * x, 9.0 * x], &mut n[..2]),
            Some(f16::from_f32(x))
        );
        assert_eq!(n[..2], [3, 9]);
        // 1/3 is no f16 times a byte with 2; an f32 with 24 significant bits is none either;
        // nor a scale past 127 times the smallest one's step, nor what is not finite.
        assert_eq!(factor(&[1.0 / 3.0, 2.0], &mut n[..2]), None);
        assert_eq!(factor(&[1.0 + f32::EPSILON], &mut n[..1]), None);
        assert_eq!(factor(&[d, d * 255.0], &mut n[..2]), None);
        assert_eq!(factor(&[f32::NAN, 1.0], &mut n[..2]), None);
        assert_eq!(factor(&[f32::INFINITY], &mut n[..1]), None);
    }
}
