//! The YAML objects of the config directory: every document of a file, as the files source reads
//! it, into `istiod_lite::objects::parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    for document in serde_saphyr::read::<_, serde_json::Value>(&mut reader).take(64) {
        let Ok(document) = document else {
            break;
        };
        if let Ok(object) = istiod_lite::objects::parse(document) {
            let _ = object.key();
        }
    }
});
