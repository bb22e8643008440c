//! CHAP authentication, target side (RFC 1994, RFC 7143 §12.1.3).
//!
//! The exchange: initiator `CHAP_A=<list>`; target `CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>`;
//! initiator `CHAP_N=<N> CHAP_R=<R>` and, for mutual CHAP, also `CHAP_I` / `CHAP_C`; target
//! (mutual only) `CHAP_N=<N> CHAP_R=<R>`. The response is `R = H(I || secret || C)`.

use md5::Md5;
use rand::RngCore;
use sha1::Sha1;
use sha2::Sha256;
use sha3::Sha3_256;

use super::negotiation::{encode_hex, parse_binary, parse_numeric};

/// CHAP digest algorithms, by their PPP algorithm numbers (RFC 1994; IANA "PPP
/// Authentication Algorithms": 5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChapAlgorithm {
    Md5,
    Sha1,
    Sha256,
    Sha3_256,
}

impl ChapAlgorithm {
    pub const ALL: [ChapAlgorithm; 4] = [
        ChapAlgorithm::Md5,
        ChapAlgorithm::Sha1,
        ChapAlgorithm::Sha256,
        ChapAlgorithm::Sha3_256,
    ];

    pub fn code(self) -> u32 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    pub fn from_code(code: u64) -> Option<ChapAlgorithm> {
        ChapAlgorithm::ALL
            .into_iter()
            .find(|a| a.code() as u64 == code)
    }

    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// Length of the challenges we send: the digest length, and at least 16 bytes.
    pub fn challenge_len(self) -> usize {
        self.digest_len().max(16)
    }

    /// `H(id || secret || challenge)` (RFC 1994 §4.1).
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn run<D: sha2::Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut h = D::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
        match self {
            ChapAlgorithm::Md5 => run::<Md5>(id, secret, challenge),
            ChapAlgorithm::Sha1 => run::<Sha1>(id, secret, challenge),
            ChapAlgorithm::Sha256 => run::<Sha256>(id, secret, challenge),
            ChapAlgorithm::Sha3_256 => run::<Sha3_256>(id, secret, challenge),
        }
    }
}

/// A CHAP name and secret. `Debug` does not print the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: String,
}

/// Secrets shorter than this carry less than the 96 random bits below which RFC 7143 §12.1.3
/// requires IPsec; configuration should warn about them (interoperability keeps them legal).
pub const MIN_RECOMMENDED_SECRET_LEN: usize = 12;

impl ChapCredentials {
    /// Whether the secret is shorter than [`MIN_RECOMMENDED_SECRET_LEN`] bytes.
    pub fn is_short(&self) -> bool {
        self.secret.len() < MIN_RECOMMENDED_SECRET_LEN
    }
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a CHAP exchange failed; every case ends the login with "authentication failure".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("CHAP_A offers no algorithm we accept: {0:?}")]
    NoCommonAlgorithm(String),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} is not expected at this point of the CHAP exchange")]
    Unexpected(&'static str),
    #[error("unknown CHAP name {0:?}")]
    UnknownUser(String),
    #[error("CHAP response for {0:?} does not match")]
    BadResponse(String),
    #[error("the initiator's challenge reflects ours")]
    ReflectedChallenge,
    #[error("the initiator asked for mutual CHAP but the target has no credentials for it")]
    MutualNotConfigured,
    #[error("mutual CHAP secret equals the initiator's secret")]
    SameSecret,
}

/// Constant-time equality for responses (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from short-circuiting the fold.
    std::hint::black_box(diff) == 0
}

#[derive(Debug, Clone)]
enum State {
    AwaitAlgorithm,
    AwaitResponse {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// One CHAP exchange with one initiator, target side.
#[derive(Debug, Clone)]
pub struct ChapExchange {
    creds: ChapCredentials,
    mutual: Option<ChapCredentials>,
    allowed: Vec<ChapAlgorithm>,
    state: State,
}

impl ChapExchange {
    /// `creds` authenticate the initiator; `mutual`, if set, is what we answer with when the
    /// initiator challenges us; `allowed` are the algorithms we accept (empty means all).
    pub fn new(
        creds: ChapCredentials,
        mutual: Option<ChapCredentials>,
        allowed: &[ChapAlgorithm],
    ) -> ChapExchange {
        let allowed = if allowed.is_empty() {
            ChapAlgorithm::ALL.to_vec()
        } else {
            allowed.to_vec()
        };
        ChapExchange {
            creds,
            mutual,
            allowed,
            state: State::AwaitAlgorithm,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub fn awaiting_algorithm(&self) -> bool {
        matches!(self.state, State::AwaitAlgorithm)
    }

    /// Handles `CHAP_A`: picks the first algorithm of the initiator's list that we accept and
    /// returns `CHAP_A`, `CHAP_I` and a random `CHAP_C` (§12.1.3).
    pub fn on_algorithms(
        &mut self,
        chap_a: &str,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<(String, String)>, ChapError> {
        if !matches!(self.state, State::AwaitAlgorithm) {
            return Err(ChapError::Unexpected("CHAP_A"));
        }
        let alg = chap_a
            .split(',')
            .filter_map(parse_numeric)
            .filter_map(ChapAlgorithm::from_code)
            .find(|a| self.allowed.contains(a))
            .ok_or_else(|| ChapError::NoCommonAlgorithm(chap_a.chars().take(64).collect()))?;
        let mut id = [0u8; 1];
        rng.fill_bytes(&mut id);
        let mut challenge = vec![0u8; alg.challenge_len()];
        rng.fill_bytes(&mut challenge);
        Ok(self.challenge_with(alg, id[0], challenge))
    }

    /// Sets a chosen algorithm, identifier and challenge (exposed for deterministic tests).
    pub fn challenge_with(
        &mut self,
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    ) -> Vec<(String, String)> {
        let out = vec![
            ("CHAP_A".to_string(), alg.code().to_string()),
            ("CHAP_I".to_string(), id.to_string()),
            ("CHAP_C".to_string(), encode_hex(&challenge)),
        ];
        self.state = State::AwaitResponse { alg, id, challenge };
        out
    }

    /// Handles the initiator's `CHAP_N` / `CHAP_R` and, for mutual CHAP, its `CHAP_I` /
    /// `CHAP_C`. On success returns our `CHAP_N` / `CHAP_R` (empty without mutual CHAP).
    pub fn on_response(
        &mut self,
        name: Option<&str>,
        response: Option<&str>,
        mutual_id: Option<&str>,
        mutual_challenge: Option<&str>,
    ) -> Result<Vec<(String, String)>, ChapError> {
        let (alg, id, challenge) = match &self.state {
            State::AwaitResponse { alg, id, challenge } => (*alg, *id, challenge.clone()),
            _ => return Err(ChapError::Unexpected("CHAP_R")),
        };
        // Whatever happens next, this challenge is spent.
        self.state = State::Done;
        let name = name.ok_or(ChapError::Missing("CHAP_N"))?;
        let response = response.ok_or(ChapError::Missing("CHAP_R"))?;
        let response = parse_binary(response).ok_or(ChapError::Malformed("CHAP_R"))?;
        if name != self.creds.user {
            return Err(ChapError::UnknownUser(name.chars().take(64).collect()));
        }
        let expected = alg.response(id, self.creds.secret.as_bytes(), &challenge);
        if !ct_eq(&expected, &response) {
            return Err(ChapError::BadResponse(name.to_string()));
        }
        match (mutual_id, mutual_challenge) {
            (None, None) => Ok(Vec::new()),
            (Some(_), None) => Err(ChapError::Missing("CHAP_C")),
            (None, Some(_)) => Err(ChapError::Missing("CHAP_I")),
            (Some(i), Some(c)) => {
                let mid = parse_numeric(i)
                    .filter(|v| *v <= 255)
                    .ok_or(ChapError::Malformed("CHAP_I"))? as u8;
                let mchallenge = parse_binary(c).ok_or(ChapError::Malformed("CHAP_C"))?;
                // An initiator must not reuse our challenge (§12.1.3): that would let it
                // make us compute responses for it.
                if mchallenge == challenge {
                    return Err(ChapError::ReflectedChallenge);
                }
                let mutual = self.mutual.as_ref().ok_or(ChapError::MutualNotConfigured)?;
                // The same secret must not authenticate both directions (§12.1.3).
                if mutual.secret == self.creds.secret {
                    return Err(ChapError::SameSecret);
                }
                let ours = alg.response(mid, mutual.secret.as_bytes(), &mchallenge);
                Ok(vec![
                    ("CHAP_N".to_string(), mutual.user.clone()),
                    ("CHAP_R".to_string(), encode_hex(&ours)),
                ])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::Digest as _;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials {
            user: user.into(),
            secret: secret.into(),
        }
    }

    /// Well-known digests of "abc" (RFC 1321, FIPS 180-2, FIPS 202 examples).
    #[test]
    fn digest_known_vectors() {
        // With id = b'a' and secret = "b", the hashed input is exactly "abc".
        let cases = [
            (ChapAlgorithm::Md5, "900150983cd24fb0d6963f7d28e17f72"),
            (
                ChapAlgorithm::Sha1,
                "a9993e364706816aba3e25717850c26c9cd0d89d",
            ),
            (
                ChapAlgorithm::Sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                ChapAlgorithm::Sha3_256,
                "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
            ),
        ];
        for (alg, hex_digest) in cases {
            let got = alg.response(b'a', b"b", b"c");
            assert_eq!(hex::encode(&got), hex_digest, "{alg:?}");
            assert_eq!(got.len(), alg.digest_len());
        }
        // MD5("") straight from the crate as an anchor for the helper above.
        assert_eq!(
            hex::encode(Md5::digest(b"")),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }

    /// CHAP MD5 vector computed independently (python: hashlib.md5(bytes([1]) + b"secret"
    /// + bytes(range(16))).hexdigest()).
    #[test]
    fn chap_md5_response_formula() {
        let challenge: Vec<u8> = (0u8..16).collect();
        let r = ChapAlgorithm::Md5.response(1, b"secret", &challenge);
        let mut manual = Vec::new();
        manual.push(1u8);
        manual.extend_from_slice(b"secret");
        manual.extend_from_slice(&challenge);
        assert_eq!(r, Md5::digest(&manual).to_vec());
        assert_eq!(hex::encode(&r), "740e86463bda3a4d7017d6e0fba0699d");
    }

    #[test]
    fn picks_first_supported_algorithm_in_initiator_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut x = ChapExchange::new(creds("u", "secretsecret"), None, &[]);
        let r = x.on_algorithms("7,5", &mut rng).unwrap();
        assert_eq!(r[0], ("CHAP_A".into(), "7".into()));
        let c = parse_binary(&r[2].1).unwrap();
        assert_eq!(c.len(), 32);

        let mut x = ChapExchange::new(creds("u", "s"), None, &[ChapAlgorithm::Md5]);
        let r = x.on_algorithms("8,6,5", &mut rng).unwrap();
        assert_eq!(r[0].1, "5");
        assert_eq!(parse_binary(&r[2].1).unwrap().len(), 16);

        let mut x = ChapExchange::new(creds("u", "s"), None, &[]);
        assert!(matches!(
            x.on_algorithms("1,2,99", &mut rng),
            Err(ChapError::NoCommonAlgorithm(_))
        ));
        let mut x = ChapExchange::new(creds("u", "s"), None, &[]);
        assert!(x.on_algorithms("", &mut rng).is_err());
    }

    #[test]
    fn verifies_response_for_every_algorithm() {
        for alg in ChapAlgorithm::ALL {
            let mut x = ChapExchange::new(creds("alice", "0123456789abcdef"), None, &[]);
            let challenge = vec![0x5a; alg.challenge_len()];
            x.challenge_with(alg, 42, challenge.clone());
            let r = alg.response(42, b"0123456789abcdef", &challenge);
            assert_eq!(
                x.on_response(Some("alice"), Some(&encode_hex(&r)), None, None),
                Ok(vec![])
            );
            assert!(x.is_done());
        }
    }

    #[test]
    fn rejects_wrong_user_wrong_response_and_replays() {
        let c = vec![7u8; 16];
        let good = ChapAlgorithm::Md5.response(9, b"topsecret123", &c);
        let mut x = ChapExchange::new(creds("alice", "topsecret123"), None, &[]);
        x.challenge_with(ChapAlgorithm::Md5, 9, c.clone());
        assert!(matches!(
            x.on_response(Some("mallory"), Some(&encode_hex(&good)), None, None),
            Err(ChapError::UnknownUser(_))
        ));
        // The challenge is spent even after a failure.
        assert!(matches!(
            x.on_response(Some("alice"), Some(&encode_hex(&good)), None, None),
            Err(ChapError::Unexpected(_))
        ));

        let mut x = ChapExchange::new(creds("alice", "topsecret123"), None, &[]);
        x.challenge_with(ChapAlgorithm::Md5, 9, c.clone());
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(
            x.on_response(Some("alice"), Some(&encode_hex(&bad)), None, None),
            Err(ChapError::BadResponse(_))
        ));

        let mut x = ChapExchange::new(creds("alice", "topsecret123"), None, &[]);
        x.challenge_with(ChapAlgorithm::Md5, 9, c.clone());
        assert!(matches!(
            x.on_response(Some("alice"), Some(&encode_hex(&good[..15])), None, None),
            Err(ChapError::BadResponse(_))
        ));

        let mut x = ChapExchange::new(creds("alice", "topsecret123"), None, &[]);
        x.challenge_with(ChapAlgorithm::Md5, 9, c);
        assert!(matches!(
            x.on_response(Some("alice"), Some("zz"), None, None),
            Err(ChapError::Malformed("CHAP_R"))
        ));
        let mut x = ChapExchange::new(creds("alice", "topsecret123"), None, &[]);
        assert!(matches!(
            x.on_response(Some("alice"), Some("0x00"), None, None),
            Err(ChapError::Unexpected(_))
        ));
    }

    #[test]
    fn accepts_base64_response() {
        let c = vec![1u8; 16];
        let r = ChapAlgorithm::Sha256.response(3, b"password12345", &c);
        let b64 = {
            // Tiny encoder for the test only.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::from("0b");
            for chunk in r.chunks(3) {
                let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32)
                    << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
                for _ in chunk.len()..3 {
                    s.push('=');
                }
            }
            s
        };
        let mut x = ChapExchange::new(creds("bob", "password12345"), None, &[]);
        x.challenge_with(ChapAlgorithm::Sha256, 3, c);
        assert_eq!(
            x.on_response(Some("bob"), Some(&b64), None, None),
            Ok(vec![])
        );
    }

    #[test]
    fn mutual_chap() {
        let c = vec![3u8; 16];
        let r = ChapAlgorithm::Md5.response(1, b"initiatorsecret", &c);
        let ic = vec![0xeeu8; 32];
        let mut x = ChapExchange::new(
            creds("ini", "initiatorsecret"),
            Some(creds("tgt", "targetsecret12")),
            &[],
        );
        x.challenge_with(ChapAlgorithm::Md5, 1, c.clone());
        let out = x
            .on_response(
                Some("ini"),
                Some(&encode_hex(&r)),
                Some("77"),
                Some(&encode_hex(&ic)),
            )
            .unwrap();
        assert_eq!(out[0], ("CHAP_N".into(), "tgt".into()));
        let expected = ChapAlgorithm::Md5.response(77, b"targetsecret12", &ic);
        assert_eq!(parse_binary(&out[1].1).unwrap(), expected);

        // Reflection of our own challenge is refused.
        let mut x = ChapExchange::new(
            creds("ini", "initiatorsecret"),
            Some(creds("tgt", "targetsecret12")),
            &[],
        );
        x.challenge_with(ChapAlgorithm::Md5, 1, c.clone());
        assert_eq!(
            x.on_response(
                Some("ini"),
                Some(&encode_hex(&r)),
                Some("1"),
                Some(&encode_hex(&c))
            ),
            Err(ChapError::ReflectedChallenge)
        );

        // Mutual requested without target credentials.
        let mut x = ChapExchange::new(creds("ini", "initiatorsecret"), None, &[]);
        x.challenge_with(ChapAlgorithm::Md5, 1, c.clone());
        assert_eq!(
            x.on_response(
                Some("ini"),
                Some(&encode_hex(&r)),
                Some("1"),
                Some(&encode_hex(&ic))
            ),
            Err(ChapError::MutualNotConfigured)
        );

        // Same secret both ways.
        let mut x = ChapExchange::new(
            creds("ini", "initiatorsecret"),
            Some(creds("tgt", "initiatorsecret")),
            &[],
        );
        x.challenge_with(ChapAlgorithm::Md5, 1, c.clone());
        assert_eq!(
            x.on_response(
                Some("ini"),
                Some(&encode_hex(&r)),
                Some("1"),
                Some(&encode_hex(&ic))
            ),
            Err(ChapError::SameSecret)
        );

        // Half a mutual request, bad identifier.
        for (i, ch) in [
            (Some("1"), None),
            (None, Some("0x01")),
            (Some("256"), Some("0x01")),
        ] {
            let mut x = ChapExchange::new(
                creds("ini", "initiatorsecret"),
                Some(creds("tgt", "targetsecret12")),
                &[],
            );
            x.challenge_with(ChapAlgorithm::Md5, 1, c.clone());
            assert!(x
                .on_response(Some("ini"), Some(&encode_hex(&r)), i, ch)
                .is_err());
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn credentials_debug_hides_secret() {
        let s = format!("{:?}", creds("u", "hunter2hunter2"));
        assert!(!s.contains("hunter2"));
        assert!(creds("u", "short").is_short());
        assert!(!creds("u", "twelve-bytes").is_short());
    }
}
