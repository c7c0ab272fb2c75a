//! What the crate's unit tests share: reproducible pseudo-random inputs, and a
//! vocabulary for the grammars' masks.

/// `n` values in [−1, 1) from a 64-bit LCG seeded with `seed`.
pub fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Q8_0 blocks with one value in each set to −128: the conversions at load
/// ([`crate::kquant`]) write it (Q3_K's product 128 under a negated scale), though the
/// Q8_0 quantizer stops at −127, so every kernel is tested with it.
pub fn with_q8_0_minimum(data: &mut [u8]) {
    for (i, b) in data.chunks_exact_mut(34).enumerate() {
        b[2 + (7 * i) % 32] = 0x80;
    }
}

/// `n` 8-bit weights −32..32 (Q6_K's integers) and a scale per 16 of them, either sign,
/// of magnitude up to `scale`, each an f16.
pub fn runs16_weights(n: usize, seed: u64, scale: f32) -> (Vec<i8>, Vec<f32>) {
    let values = rand(n, seed)
        .iter()
        .map(|v| (v * 32.0).floor().clamp(-32.0, 31.0) as i8)
        .collect();
    let scales = rand(n / 16, seed + 1)
        .iter()
        .map(|v| f32::from(half::f16::from_f32(v * scale)))
        .collect();
    (values, scales)
}

/// A vocabulary of every single byte, then random printable strings of 2 to 6 bytes
/// (sharing beginnings often: 16 letters, digits and punctuation), a few multibyte
/// characters whole and split, an empty token, a special and a stop token.
pub fn grammar_vocab_tokens() -> Vec<Vec<u8>> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"abcdefghijklmnop0123456789-. ,()";
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    v.push(Vec::new());
    for s in ["é", "ü", "日本", "\u{e9}\u{e9}"] {
        v.push(s.as_bytes().to_vec());
    }
    v.push("é".as_bytes()[..1].to_vec());
    while v.len() < 6000 {
        let n = 2 + (next() % 5) as usize;
        v.push(
            (0..n)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect(),
        );
    }
    v
}

/// The special token of [`grammar_vocab`].
pub const SPECIAL: u32 = 300;
/// Its stop token.
pub const STOP: u32 = 301;

/// [`grammar_vocab_tokens`] as the grammars' vocabulary, with [`SPECIAL`] and [`STOP`].
pub fn grammar_vocab(tokens: &[Vec<u8>]) -> crate::json_mode::JsonVocab {
    crate::json_mode::JsonVocab::new(
        tokens.len(),
        |id| &tokens[id as usize],
        |id| id == SPECIAL,
        &[STOP],
    )
}

/// What a grammar's mask over [`grammar_vocab`] must be, token by token: [`SPECIAL`]
/// never, [`STOP`] where `done`, any other token (not empty) where `takes` its bytes.
pub fn mask_by_hand(
    tokens: &[Vec<u8>],
    n: usize,
    done: bool,
    takes: impl Fn(&[u8]) -> bool,
) -> Vec<u32> {
    let mut words = vec![0u32; n.div_ceil(32)];
    for id in 0..n.min(tokens.len()) as u32 {
        let ok = match id {
            SPECIAL => false,
            STOP => done,
            _ => !tokens[id as usize].is_empty() && takes(&tokens[id as usize]),
        };
        if ok {
            words[id as usize / 32] |= 1 << (id % 32);
        }
    }
    words
}
