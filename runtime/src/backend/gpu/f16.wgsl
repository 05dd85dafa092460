// f32 -> f16 bits, round to nearest even (the same rounding as the `half` crate on the CPU), so caches
// written on the GPU hold exactly the bits the CPU backend writes.
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = i32((b >> 23u) & 0xffu);
    let m = b & 0x7fffffu;
    if (e == 255) {
        if (m != 0u) { return sign | 0x7e00u; }
        return sign | 0x7c00u;
    }
    let he = e - 127 + 15;
    if (he >= 31) { return sign | 0x7c00u; }
    if (he <= 0) {
        if (he < -10) { return sign; }
        let mm = m | 0x800000u;
        let shift = u32(14 - he);
        var hm = mm >> shift;
        let rem = mm & ((1u << shift) - 1u);
        let half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (hm & 1u) == 1u)) { hm = hm + 1u; }
        return sign | hm;
    }
    var h = (u32(he) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) { h = h + 1u; }
    return sign | h;
}
fn pack_f16(a: f32, b: f32) -> u32 { return f16_bits(a) | (f16_bits(b) << 16u); }
fn f16_at(buf_word: u32, odd: bool) -> f32 {
    let v = unpack2x16float(buf_word);
    return select(v.x, v.y, odd);
}
