//! Small scalar building blocks used by the generic ops (rotary rows, smallest-k selection).

/// Rotates one head row in place with the cos/sin of its position (`cos.len() == row.len() / 2`).
pub fn rotate_row(row: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = row.len() / 2;
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (row[a], row[b]);
        row[a] = x0 * cos[i] - x1 * sin[i];
        row[b] = x0 * sin[i] + x1 * cos[i];
    }
}

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
