//! Plain, stable names for the small enums users type and JSON prints (`shift`, `llama`, `f32`,
//! `cosine`): one macro gives each its `ALL`, `name`, `Display` and `FromStr`, so the names are
//! written once.

/// `named_enum!(Type, "what", [Variant => "name", ...])` implements `Type::ALL`, `Type::name`,
/// `Display` (the name) and `FromStr` (the name back; otherwise an error listing every name).
#[macro_export]
macro_rules! named_enum {
    ($ty:ident, $what:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value, in the order the help lists them.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The command-line and JSON name.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<$ty, String> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = $ty::ALL.iter().map(|v| v.name()).collect();
                    format!("unknown {} '{s}' (choose {})", $what, names.join(", "))
                })
            }
        }
    };
}
