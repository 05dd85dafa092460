//! Small scalar building blocks used by the generic ops (smallest-k selection).

/// Indices of the `k` largest (or smallest) values, best first; ties go to the lower index.
pub fn top_k(v: &[f32], k: usize, largest: bool) -> Vec<usize> {
    let better = |a: usize, b: usize| -> bool {
        let (x, y) = (v[a], v[b]);
        if x == y {
            a < b
        } else if largest {
            x > y
        } else {
            x < y
        }
    };
    if k == 1 {
        let mut best = 0;
        for i in 1..v.len() {
            if better(i, best) {
                best = i;
            }
        }
        return if v.is_empty() { vec![] } else { vec![best] };
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        if better(a, b) {
            std::cmp::Ordering::Less
        } else if better(b, a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    idx.truncate(k);
    idx
}
