//! Image records.

use banger_proto::image::{ImageConfig, ImageInfo};
use rusqlite::{params, OptionalExtension, Row};

use super::Store;

/// A flattened image as stored. Mirrors the protocol's `ImageInfo`.
pub type ImageRecord = ImageInfo;

const COLUMNS: &str =
    "name, reference, digest, rootfs_path, size_bytes, content_bytes, config_json, created_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    let config_json: String = row.get(6)?;
    let config: ImageConfig = serde_json::from_str(&config_json).unwrap_or_default();
    Ok(ImageInfo {
        name: row.get(0)?,
        r#ref: row.get(1)?,
        digest: row.get(2)?,
        rootfs_path: row.get(3)?,
        size_bytes: row.get::<_, i64>(4)? as u64,
        content_bytes: row.get::<_, i64>(5)? as u64,
        config,
        created_at: row.get(7)?,
        vms: Vec::new(),
    })
}

impl Store {
    /// Inserts or replaces the record named `image.name`.
    pub fn put_image(&self, image: &ImageRecord) -> rusqlite::Result<()> {
        let config = serde_json::to_string(&image.config).expect("config serialises");
        self.conn().execute(
            &format!("INSERT OR REPLACE INTO images ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"),
            params![
                image.name,
                image.r#ref,
                image.digest,
                image.rootfs_path,
                image.size_bytes as i64,
                image.content_bytes as i64,
                config,
                image.created_at
            ],
        )?;
        Ok(())
    }

    pub fn get_image(&self, name: &str) -> rusqlite::Result<Option<ImageRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM images WHERE name = ?1"),
                [name],
                from_row,
            )
            .optional()
    }

    pub fn list_images(&self) -> rusqlite::Result<Vec<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM images ORDER BY name"))?;
        let rows = stmt.query_map([], from_row)?;
        rows.collect()
    }

    /// Removes a record; true when it existed.
    pub fn delete_image(&self, name: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> ImageRecord {
        ImageInfo {
            name: name.into(),
            r#ref: "docker.io/library/alpine:latest".into(),
            digest: "sha256:ab".into(),
            rootfs_path: "/x/rootfs.ext4".into(),
            size_bytes: 10,
            content_bytes: 5,
            config: ImageConfig {
                cmd: vec!["/bin/sh".into()],
                ..Default::default()
            },
            created_at: "2026-01-01T00:00:00Z".into(),
            vms: vec![],
        }
    }

    #[test]
    fn image_records_round_trip() {
        let store = Store::open_in_memory().unwrap();
        store.put_image(&sample("b")).unwrap();
        store.put_image(&sample("a")).unwrap();
        assert_eq!(store.get_image("a").unwrap().unwrap(), sample("a"));
        let names: Vec<_> = store
            .list_images()
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(store.delete_image("a").unwrap());
        assert!(!store.delete_image("a").unwrap());
        assert!(store.get_image("a").unwrap().is_none());
    }
}
