//! The synthetic language and the text corpus loader.

use dtopp::data::{SyntheticConfig, SyntheticLanguage, TextCorpus};

#[test]
fn the_stream_is_deterministic_per_seed() {
    let lang = SyntheticLanguage::new(SyntheticConfig::default()).unwrap();
    assert_eq!(lang.generate(5000, 1), lang.generate(5000, 1));
    assert_ne!(lang.generate(5000, 1).tokens, lang.generate(5000, 2).tokens);
    let again = SyntheticLanguage::new(SyntheticConfig::default()).unwrap();
    assert_eq!(lang.phrases(), again.phrases());
}

#[test]
fn difficulty_labels_match_the_generator() {
    let config = SyntheticConfig::default();
    let lang = SyntheticLanguage::new(config.clone()).unwrap();
    let s = lang.generate(20_000, 7);
    let noise_base = (config.vocab - config.noise_vocab) as u32;
    // Walk the segments: a phrase key is followed by its fixed continuation (0 bits each);
    // noise tokens come from the noise alphabet and carry log2(noise_vocab) bits or more.
    let mut i = 0;
    let mut determined = 0;
    while i < s.tokens.len() {
        if s.tokens[i] >= noise_base {
            assert!(
                s.difficulty[i] >= 6.0 - 1e-6,
                "noise token {i} labelled {}",
                s.difficulty[i]
            );
            i += 1;
            continue;
        }
        let phrase = lang
            .phrases()
            .iter()
            .find(|p| p[0] == s.tokens[i])
            .expect("a phrase starts with a key");
        assert!(
            s.difficulty[i] >= 6.0 - 1e-6,
            "key {i} labelled {}",
            s.difficulty[i]
        );
        for (offset, &t) in phrase.iter().enumerate().skip(1) {
            if i + offset >= s.tokens.len() {
                break;
            }
            assert_eq!(s.tokens[i + offset], t, "continuation at {}", i + offset);
            assert_eq!(s.difficulty[i + offset], 0.0);
            determined += 1;
        }
        i += phrase.len();
    }
    // Expected share of determined tokens: (1 - q)(L - 1) / ((1 - q) L + q n).
    let (q, l, n) = (
        config.noise_prob,
        config.phrase_len as f64,
        config.noise_len as f64,
    );
    let expected = (1.0 - q) * (l - 1.0) / ((1.0 - q) * l + q * n);
    let share = determined as f64 / s.tokens.len() as f64;
    assert!(
        (share - expected).abs() < 0.03,
        "determined share {share}, expected {expected}"
    );
}

#[test]
fn bad_language_settings_are_named() {
    let too_many = SyntheticConfig {
        phrases: 500,
        ..SyntheticConfig::default()
    };
    assert!(
        SyntheticLanguage::new(too_many)
            .unwrap_err()
            .to_string()
            .contains("phrases")
    );
    let no_room = SyntheticConfig {
        noise_vocab: 255,
        ..SyntheticConfig::default()
    };
    assert!(
        SyntheticLanguage::new(no_room)
            .unwrap_err()
            .to_string()
            .contains("noise_vocab")
    );
    let bad_p = SyntheticConfig {
        noise_prob: 1.5,
        ..SyntheticConfig::default()
    };
    assert!(
        SyntheticLanguage::new(bad_p)
            .unwrap_err()
            .to_string()
            .contains("noise_prob")
    );
}

#[test]
fn text_files_split_into_train_and_validation_bytes() {
    let dir = std::env::temp_dir().join(format!("dtopp-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, "héllo wörld ".repeat(100)).unwrap();
    let corpus = TextCorpus::load(&path, 0.1, 16).unwrap();
    let total = corpus.train.len() + corpus.validation.len();
    assert_eq!(total, std::fs::read(&path).unwrap().len());
    assert_eq!(
        corpus.validation.len(),
        (total as f64 * 0.1).round() as usize
    );
    assert!(corpus.train.iter().all(|&t| t < 256));
    let msg = TextCorpus::load(&path, 0.1, 1000).unwrap_err().to_string();
    assert!(
        msg.contains("validation split has") && msg.contains("needs 1000"),
        "{msg}"
    );
    assert!(
        TextCorpus::load(&path, 1.0, 1)
            .unwrap_err()
            .to_string()
            .contains("(0, 1)")
    );
    assert!(
        TextCorpus::load(&dir.join("missing.txt"), 0.1, 1)
            .unwrap_err()
            .to_string()
            .contains("cannot read")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
