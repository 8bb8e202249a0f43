//! Checks the model's op tests share.

/// `got` against burn's own ops' `want`, element by element: NaN where burn gives NaN,
/// else within `rtol` of `1 + |want|`, or equal (so that infinities match themselves).
pub(crate) fn assert_close_to_burn(got: &[f32], want: &[f32], rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if b.is_nan() {
            assert!(a.is_nan(), "{what}[{i}]: {a}, burn's ops give NaN");
            continue;
        }
        assert!(
            (a - b).abs() <= rtol * (1.0 + b.abs()) || a == b,
            "{what}[{i}]: {a} vs burn's ops {b}"
        );
    }
}
